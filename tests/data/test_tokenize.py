"""twotower-tokenize: round trip against the tokenizer applied to the raw documents, manifest counts,
splits, determinism, atomic shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from data_helpers import make_docs, write_jsonl

from twotower.data.shards import AtomicShardWriter
from twotower.data.tokenize import main, tokenize_corpus
from twotower.data.tokenizers import ByteTokenizer


def read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    """Oracle reader: plain webdataset with its default decoders, no twotower code."""
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def write_corpus(tmp: Path) -> tuple[list[Path], list[str]]:
    """.jsonl (custom key), .txt and .parquet inputs; returns files and documents in sorted-file order."""
    d = tmp / "corpus"
    a = make_docs(40, "a", seed=3)
    b = make_docs(30, "b", seed=4)
    c = "a plain text document\nwith two lines ☃"
    write_jsonl(d / "a.jsonl", a, key="body")
    pq.write_table(pa.table({"body": b}), d / "b.parquet")
    (d / "c.txt").write_text(c, encoding="utf-8")
    return [d / "a.jsonl", d / "b.parquet", d / "c.txt"], a + b + [c]


@pytest.mark.parametrize("boundaries", [False, True])
def test_round_trip_matches_tokenizer(tmp_path, boundaries):
    _files, docs = write_corpus(tmp_path)
    out = tmp_path / "tok"
    man = tokenize_corpus(
        [str(tmp_path / "corpus")],
        out,
        "byte",
        seq_len=50,
        text_key="body",
        workers=2,
        samples_per_shard=7,
        store_boundaries=boundaries,
    )
    tok = ByteTokenizer()
    expected = np.concatenate([np.array(tok.encode(d) + [tok.eos_id]) for d in docs])
    samples = read_split(out, man, "train")
    got = np.concatenate([s["tokens.npy"][: s["json"]["length"]] for s in samples])
    np.testing.assert_array_equal(got, expected)  # nothing lost, duplicated or reordered
    assert all(s["tokens.npy"].dtype == np.uint32 and s["tokens.npy"].shape == (50,) for s in samples)
    assert all(s["json"]["length"] == 50 for s in samples[:-1])
    assert (samples[-1]["tokens.npy"][samples[-1]["json"]["length"] :] == tok.pad_id).all()
    # the manifest's counts equal what is in the tars
    train = man["splits"]["train"]
    assert train["samples"] == len(samples) == sum(s["samples"] for s in train["shards"])
    assert train["tokens"] == expected.size
    for shard in train["shards"]:
        in_tar = read_split(out, {"splits": {"x": {"shards": [shard]}}}, "x")
        assert shard["samples"] == len(in_tar)
        assert shard["tokens"] == sum(s["json"]["length"] for s in in_tar)
    assert json.loads((out / "manifest.json").read_text()) == man
    assert (man["tokenizer"], man["vocab_size"], man["eos_id"], man["seq_len"]) == ("byte", 260, 2, 50)
    assert samples[0]["json"]["source"].endswith("a.jsonl")
    if boundaries:
        for s in samples:
            ids, toks, n = s["doc_ids.npy"], s["tokens.npy"], s["json"]["length"]
            # a new document starts exactly after each EOS
            starts = np.flatnonzero(np.diff(ids[:n]) != 0) + 1
            np.testing.assert_array_equal(starts, np.flatnonzero(toks[: n - 1] == tok.eos_id) + 1)
            assert (ids[n:] == -1).all()


def test_val_ratio_split_is_stable_and_worker_independent(tmp_path):
    docs = make_docs(400, "d", seed=5)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    m1 = tokenize_corpus(
        [str(src)], tmp_path / "o1", "byte", 64, val_ratio=0.2, workers=1, samples_per_shard=16
    )
    m2 = tokenize_corpus(
        [str(src)], tmp_path / "o2", "byte", 64, val_ratio=0.2, workers=2, samples_per_shard=16
    )
    assert [s["sha256"] for s in m1["splits"]["train"]["shards"]] == [
        s["sha256"] for s in m2["splits"]["train"]["shards"]
    ]
    n_val = m1["splits"]["valid"]["documents"]
    assert 400 * 0.2 - 4 * (400 * 0.16) ** 0.5 < n_val < 400 * 0.2 + 4 * (400 * 0.16) ** 0.5
    total = sum(len(ByteTokenizer().encode(d)) + 1 for d in docs)
    assert m1["splits"]["train"]["tokens"] + m1["splits"]["valid"]["tokens"] == total


def test_val_by_file(tmp_path):
    tr = write_jsonl(tmp_path / "tr.jsonl", make_docs(20, "t"))
    va = write_jsonl(tmp_path / "va.jsonl", ["validation doc one", "two"])
    man = tokenize_corpus([str(tr)], tmp_path / "o", "byte", 16, val_inputs=[str(va)], workers=1)
    vals = read_split(tmp_path / "o", man, "valid")
    got = np.concatenate([s["tokens.npy"][: s["json"]["length"]] for s in vals])
    tok = ByteTokenizer()
    np.testing.assert_array_equal(got, tok.encode("validation doc one") + [2] + tok.encode("two") + [2])
    assert man["splits"]["valid"]["documents"] == 2 and man["splits"]["train"]["documents"] == 20


def test_cli_entry_point(tmp_path, capsys):
    src = write_jsonl(tmp_path / "x" / "d.jsonl", make_docs(30, "c"))
    main(
        [
            "--input",
            str(tmp_path / "x" / "*.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--tokenizer",
            "byte",
            "--seq-len",
            "32",
            "--workers",
            "1",
            "--val-ratio",
            "0.1",
        ]
    )
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["splits"]["train"]["samples"] > 0 and src.exists()
    assert "tokens/s" in capsys.readouterr().err  # progress / summary line
    with pytest.raises(SystemExit) as exc:  # an existing dataset is not silently overwritten
        main(["--input", str(src), "--output", str(tmp_path / "o"), "--seq-len", "32"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_console_script_installed(tmp_path):
    script = Path(sys.executable).parent / "twotower-tokenize"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "--seq-len" in res.stdout


def test_shards_appear_atomically(tmp_path):
    w = AtomicShardWriter(tmp_path, "train", samples_per_shard=2)
    w.write("k0", np.zeros(4, np.uint32), {"length": 4})
    assert not list(tmp_path.glob("*.tar"))  # half-written shard has a hidden temporary name
    w.write("k1", np.zeros(4, np.uint32), {"length": 4})
    assert [p.name for p in tmp_path.glob("*.tar")] == ["train-000000.tar"]
    w.write("k2", np.zeros(4, np.uint32), {"length": 4})
    shards = w.close()
    assert [s["samples"] for s in shards] == [2, 1] and not list(tmp_path.glob(".*.tmp"))
