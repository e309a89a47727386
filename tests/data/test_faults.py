"""Fault audit, data side: each fault injected for real into a tokenized dataset, its loader or its
worker processes; each test checks the error type (what ``twotower-train`` maps to its exit code),
that the message names the culprit, and that nothing was lost.

Items: 7 (DataLoader workers survive the scheduler's SIGTERM / SIGUSR1), 9 (they die with their
parent), 11 (bad manifests, shards, indexes, moved datasets, out-of-vocabulary ids; twotower-tokenize's
input errors and safe ``--overwrite``). The CLI side of the same faults: tests/training/test_cli_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from data_helpers import file_digests, make_docs, npy_bytes, tokenized, write_jsonl, write_raw_dataset

from twotower.data.config import DataConfig
from twotower.data.loader import TokenLoader
from twotower.data.shards import BadSampleError, DatasetError, DatasetNotFoundError
from twotower.data.tokenize import main as tokenize_main

L = 8


def _loader(path, **kw) -> TokenLoader:
    base = {"seq_len": L, "num_workers": 0, "shuffle_buffer": 4, "vocab_size": 260}
    return TokenLoader(DataConfig(train=[{"path": str(path)}], **{**base, **kw}), 0, 1, 2)


def _take(loader, n: int) -> list[list[int]]:
    return [next(loader)["tokens"].tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tokenized(tmp_path_factory.mktemp("faults"), "good", make_docs(60, "g", seed=3), seq_len=L,
                     shard_samples=256)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- item 11
def test_bad_manifests_are_named_before_any_worker_starts(dataset, tmp_path):
    """Missing / non-JSON manifest, a listed shard or index that is gone, another seq_len."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'empty' / 'manifest.json'}: no manifest") as e:
        _loader(tmp_path / "empty")
    assert isinstance(e.value, FileNotFoundError)  # still what callers of read_manifest caught before

    broken = _copy(dataset, tmp_path / "broken")
    (broken / "manifest.json").write_text('{"format": "twotower-tokens/1", "splits": ')
    with pytest.raises(DatasetError, match=rf"{broken / 'manifest.json'}: not valid JSON \(line 1"):
        _loader(broken)

    for ghost in ("train-000001.tar", "train-000000.idx.npz"):
        d = _copy(dataset, tmp_path / f"ghost-{ghost}")
        (d / ghost).unlink()
        with pytest.raises(DatasetNotFoundError, match=f"{d / 'manifest.json'}: split 'train' lists .*{ghost} "
                                                       "which is missing"):
            _loader(d)

    with pytest.raises(DatasetError, match=rf"seq_len 8 in manifest.json != DataConfig.seq_len 16 "
                                           rf"\({dataset / 'manifest.json'}\)"):
        _loader(dataset, seq_len=16)
    assert len(_take(_loader(dataset), 3)) == 3  # the good dataset is untouched and still reads


def test_truncated_index_is_named_through_a_worker(dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    for index in d.glob("*.idx.npz"):
        index.write_bytes(index.read_bytes()[:100])
    loader = _loader(d, num_workers=1, shuffle_buffer=1)
    with pytest.raises(BadSampleError) as e:
        next(loader)
    msg = str(e.value)
    assert re.search(rf"unreadable index {d}/train-\d{{6}}\.idx\.npz \(BadZipFile: .*truncated", msg), msg
    assert "Traceback" not in msg and not msg.startswith("Caught")  # the worker's wrapper is removed


def test_moved_dataset_resumes_only_by_position_and_with_the_same_shards(dataset, tmp_path):
    orig = _copy(dataset, tmp_path / "orig")
    first = _loader(orig, num_workers=1)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    expected = _take(first, 5)
    del first

    moved = tmp_path / "moved"
    orig.rename(moved)
    refused = _loader(moved, num_workers=1)
    with pytest.raises(DatasetError, match=rf"{orig} -> {moved}\) with the same contents, set "
                                           r"data\.on_path_change=by_position"):
        refused.load_state_dict(state)

    follow = _loader(moved, num_workers=1, on_path_change="by_position")
    follow.load_state_dict(state)
    assert _take(follow, 5) == expected  # exactly where the checkpoint left off

    other = tokenized(tmp_path, "other", make_docs(60, "o", seed=9), seq_len=L)  # re-tokenized: other shards
    with pytest.raises(DatasetError, match=f"{orig} -> {other}: the dataset now there has other shards"):
        _loader(other, num_workers=1, on_path_change="by_position").load_state_dict(state)


def test_out_of_vocab_id_is_named_when_the_manifest_has_no_vocabulary(tmp_path):
    bad = {"__key__": "s001", "tokens.npy": npy_bytes(np.full(L, 300, np.uint32)), "json": b'{"length": 8}'}
    good = {"__key__": "s000", "tokens.npy": npy_bytes(np.full(L, 9, np.uint32)), "json": b'{"length": 8}'}
    d = write_raw_dataset(tmp_path / "novocab", [good, bad], seq_len=L, vocab_size=None)
    assert "vocab_size" not in json.loads((d / "manifest.json").read_text())
    loader = TokenLoader(DataConfig(train=[{"path": str(d)}], seq_len=L, num_workers=0, shuffle_buffer=1,
                                    vocab_size=260), 0, 1, 1, one_pass=True)  # the model's, as training sets it
    with pytest.raises(BadSampleError, match=r"train-000000.tar key 's001': token id 300 outside the model "
                                             r"vocab \[0, 260\)"):
        list(loader)


def test_tokenize_names_non_utf8_input_by_file_and_line(tmp_path, capsys):
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"first line\nsecond \xff line\n")
    for path, line in ((jl, 3), (txt, 2)):
        with pytest.raises(SystemExit) as e:
            tokenize_main(["--input", str(path), "--output", str(tmp_path / "out"), "--seq-len", "8", "--workers", "1"])
        assert e.value.code == 2
        assert f"{path}:{line}: not UTF-8 text (byte 0x" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tokenize_treats_an_empty_txt_like_an_empty_jsonl(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    errors = []
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(SystemExit) as e:
            tokenize_main(["--input", str(tmp_path / name), "--output", str(tmp_path / name[6:]), "--seq-len", "8"])
        assert e.value.code == 2
        errors.append(capsys.readouterr().err.split("]: ")[-1])
    assert errors[0] == errors[1] and "no training documents" in errors[0]
    docs = write_jsonl(tmp_path / "docs" / "a.jsonl", make_docs(10, "d"))
    with_empty = tmp_path / "with_empty"
    tokenize_main(["--input", str(docs), str(tmp_path / "empty.txt"), "--output", str(with_empty), "--seq-len", "8",
                   "--workers", "1"])
    only = tmp_path / "only"
    tokenize_main(["--input", str(docs), "--output", str(only), "--seq-len", "8", "--workers", "1"])
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (with_empty, only))
    assert a["splits"] == b["splits"]  # the empty file added no document, not even an EOS sample


def test_tokenize_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, capsys):
    out = tokenized(tmp_path, "ds", make_docs(80, "old"), seq_len=L, shard_samples=16)
    before = file_digests(out)
    good = write_jsonl(tmp_path / "new" / "a.jsonl", make_docs(30, "new"))
    bad = tmp_path / "new" / "b.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n' * 50 + b'{"text": "\xc3("}\n')
    args = ["--input", str(good), str(bad), "--output", str(out), "--seq-len", str(L), "--workers", "1",
            "--shard-samples", "4", "--overwrite"]
    with pytest.raises(SystemExit) as e:
        tokenize_main(args)
    assert e.value.code == 2 and f"{bad}:51: not UTF-8" in capsys.readouterr().err
    assert file_digests(out) == before  # the failed run wrote and deleted nothing
    assert not list(out.glob(".tokenize-*"))

    tokenize_main(args[:2] + args[3:])  # only the good input: replaces the dataset
    man = json.loads((out / "manifest.json").read_text())
    names = {s[k] for i in man["splits"].values() for s in i["shards"] for k in ("name", "index")}
    assert {p.name for p in out.iterdir() if p.is_file()} == names | {"manifest.json"}  # old shards gone
    assert man["inputs"] == [str(good)] and man["splits"]["train"]["documents"] == 30
    one_pass = TokenLoader(DataConfig(train=[{"path": str(out)}], seq_len=L, num_workers=0), 0, 1, 1, one_pass=True)
    assert sum(len(b["tokens"]) for b in one_pass) == man["splits"]["train"]["samples"]


# ------------------------------------------------------------------------------------- items 7 and 9
def _sig_blocked(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {s for s in range(1, 64) if mask >> (s - 1) & 1}
    return set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_workers_survive_stop_signals_and_die_with_their_parent(dataset, tmp_path):
    """Item 7: a worker ignores SIGTERM / SIGUSR1 and keeps serving the same batches. Item 9: when the
    process that owns the loader is SIGKILLed, its worker is gone within seconds."""
    plain = _take(_loader(dataset, num_workers=1), 6)
    loader = _loader(dataset, num_workers=1)
    got = _take(loader, 2)
    (worker,) = [c for c in psutil.Process().children() if c.name() == "pt_data_worker"]
    assert {signal.SIGTERM, signal.SIGUSR1} <= _sig_blocked(worker.pid)  # taken by its shield thread
    for sig in ("SIGTERM", "SIGUSR1"):  # from another process, as scancel / slurmstepd sends them
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.{sig})"], check=True)
    time.sleep(0.3)
    got += _take(loader, 4)
    assert worker.is_running() and got == plain
    loader._close_workers()  # the DataLoader's own shutdown (SIGTERM from the parent) still ends it
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE

    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from twotower.data.config import DataConfig
        from twotower.data.loader import TokenLoader
        ld = TokenLoader(DataConfig(train=[{{"path": {str(dataset)!r}}}], seq_len={L}, num_workers=1), 0, 1, 2)
        next(ld)
        import psutil
        print(*[c.pid for c in psutil.Process().children()], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split()]
    assert pids, "the loader started no worker"
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    for p in alive:  # do not leak them into the rest of the run
        os.kill(p, signal.SIGKILL)
    assert not alive, f"orphaned DataLoader workers {alive}"
