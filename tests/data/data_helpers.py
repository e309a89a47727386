"""Helpers of the data tests: small corpora and tokenized datasets built in tmp dirs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

from twotower.data.shards import FORMAT, write_manifest
from twotower.data.tokenize import tokenize_corpus


def make_docs(n: int, tag: str, seed: int = 0) -> list[str]:
    """Distinct documents of varied length (some multi-byte UTF-8) so packing crosses sample edges."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta", "theta"]
    return [f"{tag}{i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def tokenized(tmp: Path, name: str, docs: list[str], seq_len: int = 64, shard_samples: int = 8, **kw) -> Path:
    src = write_jsonl(tmp / f"{name}-raw" / "docs.jsonl", docs)
    out = tmp / name
    tokenize_corpus([str(src)], out, "byte", seq_len, workers=1, samples_per_shard=shard_samples, **kw)
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_raw_dataset(out: Path, samples: list[dict], seq_len: int, vocab_size: int | None = 260) -> Path:
    """A one-shard dataset of hand-made raw samples ({"__key__", ext: bytes}) plus a matching manifest
    (``vocab_size=None``: a manifest that records no vocabulary, as other tools may write)."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "train-000000.tar"), encoder=False) as w:
        for s in samples:
            w.write(s)
    shard = {"name": "train-000000.tar", "samples": len(samples), "tokens": 0, "bytes": 0, "sha256": ""}
    manifest = {
        "format": FORMAT,
        "tokenizer": "byte",
        "vocab_size": vocab_size,
        "eos_id": 2,
        "pad_id": 0,
        "seq_len": seq_len,
        "dtype": "uint32",
        "boundaries": False,
        "splits": {
            "train": {"shards": [shard], "samples": len(samples), "tokens": 0},
            "valid": {"shards": [], "samples": 0, "tokens": 0},
        },
    }
    if vocab_size is None:
        del manifest["vocab_size"]
    write_manifest(out, manifest)
    return out


def file_digests(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): to show that nothing was changed or lost."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
