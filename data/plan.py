"""What the loader's workers read: validated datasets of one split, and the sample decoder.

Stage: loader construction (main process; :class:`ReadPlan` is pickled into every worker).
Input: a :class:`DataConfig`, the split, ``dp_size``. Output: per dataset its shard list (paths,
sample counts, offset indexes) cut into virtual shards for ``dp_size * num_workers`` reader slots,
and the per-slot streams (data/stream.py). Every manifest is read and checked here, before a
worker or a training step exists: a missing or unreadable ``manifest.json``, a shard it lists that
is gone, another ``seq_len``, a tokenizer vocabulary larger than the model's or an empty split
raise :class:`DatasetError` naming the manifest (``twotower-train`` exits 5).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from twotower.data.config import DataConfig
from twotower.data.shards import (
    BadSampleError,
    DatasetError,
    IndexedShard,
    ShardInfo,
    decode_sample,
    read_manifest,
)
from twotower.data.stream import SlotStream, virtual_shards
from twotower.data.tokenizers import check_vocab

log = logging.getLogger(__name__)


class Decoder:
    """Picklable decode + validate step; in skip mode it logs every bad sample with a running count."""

    def __init__(self, seq_len: int, vocab_size: int | None, with_doc_ids: bool, skip: bool):
        self.seq_len, self.vocab_size, self.with_doc_ids, self.skip = seq_len, vocab_size, with_doc_ids, skip
        self.skipped = 0

    def open_indexed(self, v) -> IndexedShard:
        return IndexedShard(v.path, v.index, v.total, self.seq_len, self.vocab_size, self.with_doc_ids)

    def many(self, shard: IndexedShard, js: list[int]) -> list[dict | None]:
        """Samples ``js`` of an indexed shard, in order; the same results, errors and logs as one by one."""
        fast = shard.samples(js)
        return [s if s is not None else self((shard, j)) for s, j in zip(fast, js)]

    def __call__(self, item: dict | tuple) -> dict | None:
        try:
            if isinstance(item, tuple):  # (IndexedShard, sample number): the memory-mapped fast path
                return item[0].sample(item[1])
            return decode_sample(item, self.seq_len, self.vocab_size, self.with_doc_ids)
        except BadSampleError as exc:
            if not self.skip:
                raise
            self.skipped += 1
            log.warning("skipping bad sample #%d: %s", self.skipped, exc)
            return None


def dataset_fingerprint(manifest: dict, split: str) -> str:
    """A short digest of a split's shards (names, sample counts, checksums): equal for a copy or
    a moved dataset, different after re-tokenization."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    rows = [[s.get("name"), s.get("samples"), s.get("sha256")] for s in shards]
    return hashlib.sha256(json.dumps([manifest.get("seq_len"), rows]).encode()).hexdigest()[:16]


def check_manifest(path: str | Path, manifest: dict, cfg: DataConfig, split: str) -> None:
    """One dataset's manifest against the config; :class:`DatasetError` naming the manifest."""
    where = Path(path) / "manifest.json"
    if manifest["seq_len"] != cfg.seq_len:
        raise DatasetError(
            f"dataset {path}: seq_len {manifest['seq_len']} in manifest.json != DataConfig.seq_len "
            f"{cfg.seq_len} ({where}); re-tokenize or change data.seq_len"
        )
    if manifest.get("vocab_size") is not None:  # no vocabulary recorded: every sample is still checked
        try:
            check_vocab(manifest["vocab_size"], cfg.vocab_size,
                        f"dataset {path} (tokenizer {manifest.get('tokenizer')}, {where})")
        except ValueError as exc:
            raise DatasetError(str(exc)) from exc
    if not manifest["splits"].get(split, {}).get("samples"):
        raise DatasetError(f"dataset {path}: split {split!r} is empty (see {where})")


class ReadPlan:
    """Everything a worker needs to build its streams (picklable, built once in the main process)."""

    def __init__(self, cfg: DataConfig, split: str, dp_size: int, one_pass: bool = False):
        self.cfg, self.split, self.dp_size, self.one_pass = cfg, split, dp_size, one_pass
        self.W = max(1, cfg.num_workers)
        paths = [d.path for d in cfg.train] if split == "train" else [cfg.valid_path]
        self.weights = [d.weight for d in cfg.train] if split == "train" else [1.0]
        self.names = [str(p) for p in paths]
        manifests = [read_manifest(p) for p in paths]
        for path, m in zip(paths, manifests):
            check_manifest(path, m, cfg, split)
        self.fingerprints = [dataset_fingerprint(m, split) for m in manifests]
        self.with_doc_ids = all(m.get("boundaries") for m in manifests)
        self.shards = [
            [
                ShardInfo(
                    str(Path(p) / s["name"]),
                    s["samples"],
                    str(Path(p) / s["index"]) if s.get("index") else None,
                )
                for s in m["splits"][split]["shards"]
            ]
            for p, m in zip(paths, manifests)
        ]
        self.layout_vshards(dp_size)

    def layout_vshards(self, dp_size: int) -> None:
        try:
            self.vshards = [virtual_shards(s, dp_size * self.W, n) for s, n in zip(self.shards, self.names)]
        except ValueError as exc:  # too few samples for the reader slots
            raise DatasetError(str(exc)) from exc

    def streams(self, slot: int, base_epochs: list[int], decode) -> list[SlotStream]:
        train = self.split == "train"
        return [
            SlotStream(
                vs,
                slot=slot,
                n_slots=self.dp_size * self.W,
                seed=self.cfg.seed,
                dataset_index=i,
                shuffle=train,
                block=self.cfg.shuffle_buffer,
                finite=not train or self.one_pass,
                base_epoch=base_epochs[i],
                decode=decode,
                open_indexed=decode.open_indexed if decode is not None else None,
            )
            for i, vs in enumerate(self.vshards)
        ]
