"""Bad input fails loudly, naming the file / shard / key (or, in skip mode, is logged and counted)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from data_helpers import make_docs, npy_bytes, tokenized, write_jsonl, write_raw_dataset

from twotower.data.config import DataConfig
from twotower.data.loader import TokenLoader
from twotower.data.shards import BadSampleError
from twotower.data.tokenize import tokenize_corpus

L = 8


def good(i: int) -> dict:
    return {
        "__key__": f"s{i:03d}",
        "tokens.npy": npy_bytes(np.full(L, 10 + i, np.uint32)),
        "json": json.dumps({"length": L}).encode(),
    }


def loader(path, **kw) -> TokenLoader:
    base = {"seq_len": L, "num_workers": 0, "shuffle_buffer": 1, "vocab_size": 260}
    base.update(kw)
    return TokenLoader(DataConfig(train=[{"path": str(path)}], **base), 0, 1, 1, one_pass=True)


BAD = {
    "missing": ({"__key__": "bad", "json": b"{}"}, "key 'bad': sample has no tokens.npy"),
    "dtype": ({"__key__": "bad", "tokens.npy": npy_bytes(np.zeros(L, np.float32))}, "dtype float32"),
    "length": ({"__key__": "bad", "tokens.npy": npy_bytes(np.zeros(L + 1, np.uint32))}, r"shape \(9,\)"),
    "vocab": (
        {"__key__": "bad", "tokens.npy": npy_bytes(np.full(L, 300, np.uint32))},
        "token id 300 outside",
    ),
    "not_npy": ({"__key__": "bad", "tokens.npy": b"garbage"}, "not a valid .npy"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_raises_naming_shard_and_key(tmp_path, case):
    sample, msg = BAD[case]
    d = write_raw_dataset(tmp_path / case, [good(0), sample, good(2)], seq_len=L)
    with pytest.raises(BadSampleError, match=msg) as exc:
        list(loader(d))
    assert "train-000000.tar" in str(exc.value) and "'bad'" in str(exc.value)


def test_skip_mode_logs_every_skipped_sample(tmp_path, caplog):
    samples = [good(0), BAD["dtype"][0], good(2), {**BAD["vocab"][0], "__key__": "bad2"}, good(4)]
    d = write_raw_dataset(tmp_path / "d", samples, seq_len=L)
    with caplog.at_level(logging.WARNING):
        got = [int(b["tokens"][0, 0]) for b in loader(d, on_bad_sample="skip")]
    assert got == [10, 12, 14]
    msgs = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert (
        len(msgs) == 2 and "#1" in msgs[0] and "'bad'" in msgs[0] and "#2" in msgs[1] and "'bad2'" in msgs[1]
    )


def _drop_index(d):
    """Make the loader use webdataset's streaming tar reader (as for shards written by other tools)."""
    man = json.loads((d / "manifest.json").read_text())
    for shard in man["splits"]["train"]["shards"]:
        shard.pop("index")
    (d / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("indexed", [True, False])
def test_truncated_and_corrupt_tar(tmp_path, indexed):
    d = tokenized(tmp_path, "t", make_docs(60, "t"), seq_len=L, shard_samples=1000)
    if not indexed:
        _drop_index(d)
    shard = d / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = "truncated or modified" if indexed else "(unreadable tar after key 'train-|ended after)"
    with pytest.raises(BadSampleError, match=f"train-000000.tar.*{msg}"):
        list(loader(d, vocab_size=None))
    shard.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BadSampleError, match="train-000000.tar"):
        list(loader(d, vocab_size=None))


def test_corrupt_bytes_inside_indexed_shard_name_the_key(tmp_path):
    d = tokenized(tmp_path, "t", make_docs(20, "t"), seq_len=L, shard_samples=1000)
    shard = d / "train-000000.tar"
    with np.load(d / "train-000000.idx.npz") as z:
        off = int(z["tokens"][5][0])
    data = bytearray(shard.read_bytes())
    data[off : off + 6] = b"XXXXXX"  # same size, broken .npy magic of sample 5
    shard.write_bytes(bytes(data))
    with pytest.raises(
        BadSampleError, match=r"train-000000.tar key 'train-000000005' tokens.npy: not a valid"
    ):
        list(loader(d, vocab_size=None))


def test_indexed_and_webdataset_readers_agree(tmp_path):
    d = tokenized(tmp_path, "t", make_docs(50, "t"), seq_len=L, shard_samples=100, store_boundaries=True)
    fast = [(b["tokens"], b["loss_mask"], b["doc_ids"]) for b in loader(d, shuffle_buffer=7)]
    _drop_index(d)
    slow = [(b["tokens"], b["loss_mask"], b["doc_ids"]) for b in loader(d, shuffle_buffer=7)]
    assert len(fast) == len(slow) > 100
    for a, b in zip(fast, slow):
        assert all(x.equal(y) for x, y in zip(a, b))


def test_shard_with_fewer_samples_than_manifest(tmp_path):
    d = write_raw_dataset(tmp_path / "d", [good(0), good(1)], seq_len=L)
    man = json.loads((d / "manifest.json").read_text())
    man["splits"]["train"]["shards"][0]["samples"] = 3
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BadSampleError, match="ended after 2 of the 3 samples"):
        list(loader(d))


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"glob .*nothing\*\.jsonl.* matched no files"):
        tokenize_corpus([str(tmp_path / "nothing*.jsonl")], tmp_path / "o", "byte", 8)
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenize_corpus([str(tmp_path / "missing.jsonl")], tmp_path / "o", "byte", 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        tokenize_corpus([str(bad)], tmp_path / "o", "byte", 8, workers=1)
    nokey = write_jsonl(tmp_path / "nokey.jsonl", ["a"], key="content")
    with pytest.raises(KeyError, match=r"nokey.jsonl:1: record has no 'text' field"):
        tokenize_corpus([str(nokey)], tmp_path / "o", "byte", 8, workers=1)


def test_loader_rejects_mismatched_dataset(tmp_path):
    d = tokenized(tmp_path, "t", make_docs(30, "t"), seq_len=L)
    with pytest.raises(ValueError, match="vocab_size 260 exceeds the model's vocab_size 100"):
        loader(d, vocab_size=100)
    with pytest.raises(ValueError, match="seq_len 8 in manifest.json != DataConfig.seq_len 16"):
        loader(d, seq_len=16)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        loader(tmp_path / "t-raw")


def test_data_config_validation():
    with pytest.raises(ValueError, match="train is empty"):
        DataConfig()
    with pytest.raises(ValueError, match=r"train\[0\] \(x\): weight must be > 0"):
        DataConfig(train=[{"path": "x", "weight": 0}])
    with pytest.raises(ValueError, match="on_bad_sample='drop'; choose one of"):
        DataConfig(train=[{"path": "x"}], on_bad_sample="drop")
    with pytest.raises(ValueError, match="unknown field"):
        DataConfig.from_any({"train": [{"path": "x"}], "sq_len": 3})


def test_int32_tokens_are_accepted(tmp_path):
    s = {"__key__": "i32", "tokens.npy": npy_bytes(np.arange(4, 4 + L, dtype=np.int32))}
    d = write_raw_dataset(tmp_path / "d", [s, good(1)], seq_len=L)
    got = [b["tokens"][0].tolist() for b in loader(d)]
    assert got == [list(range(4, 4 + L)), [11] * L]
