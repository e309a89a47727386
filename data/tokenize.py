"""``twotower-tokenize``: text corpora -> webdataset shards of fixed-length token sequences.

Stage: offline preprocessing. Input: .txt/.jsonl/.parquet files, directories or globs (data/corpus.py).
Output: ``--output DIR`` with ``train-*.tar``, ``valid-*.tar`` and ``manifest.json`` (data/shards.py).

Documents are tokenized in a process pool (``--workers``, default: all cores given to this process),
in order, so the output is byte-identical for any worker count. The main process concatenates
every document followed by EOS and cuts the stream into ``seq_len`` samples; the last sample of a
split is padded with ``pad_id`` and its real length is stored, so no token is dropped.
``--store-boundaries`` adds a per-token ``doc_ids.npy`` (document index within the sample, -1 on
padding) for document-aware loss masking.

Train/validation split: ``--val-input`` sends whole files to validation; ``--val-ratio R`` sends a
document to validation when a hash of (file name, document index) falls below R, which is stable
across runs and machines.

Replacing a dataset (``--overwrite``) is safe: the new shards are written into a staging folder
inside ``--output`` and moved into place only once the whole corpus is tokenized; a failure (a bad
input line, an interrupted run) leaves the previous dataset as it was. Exit status 2 on bad input,
with the file (and line) named.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from twotower.data.corpus import expand_inputs, iter_documents
from twotower.data.shards import FORMAT, MANIFEST, AtomicShardWriter, write_manifest
from twotower.data.tokenizers import check_vocab, load_tokenizer

log = logging.getLogger(__name__)

DOCS_PER_TASK = 64  # per pool task: big enough to amortize pickling, small enough for steady progress
_TOKENIZER = None


class _Packer:
    """Concatenates documents (+EOS) of one split and writes seq_len samples to shards."""

    def __init__(self, split: str, writer: AtomicShardWriter, seq_len: int, eos: int, pad: int, bounds: bool):
        self.split, self.writer, self.seq_len = split, writer, seq_len
        self.eos, self.pad, self.bounds = eos, pad, bounds
        self.chunks: list[np.ndarray] = []
        self.doc_chunks: list[np.ndarray] = []
        self.pending = 0
        self.docs: list[tuple[str, int]] = []  # (file, index) of every document, by global doc number
        self.doc_lens: list[int] = []
        self._first_doc = 0
        self._consumed = 0
        self.samples = 0
        self.tokens = 0

    def add(self, source: str, doc_index: int, ids: list[int]) -> None:
        doc_no = len(self.docs)
        self.docs.append((source, doc_index))
        self.doc_lens.append(len(ids) + 1)
        arr = np.empty(len(ids) + 1, dtype=np.uint32)
        arr[:-1] = ids
        arr[-1] = self.eos
        self.chunks.append(arr)
        if self.bounds:
            self.doc_chunks.append(np.full(arr.size, doc_no, dtype=np.int64))
        self.pending += arr.size
        self.tokens += arr.size
        if self.pending >= self.seq_len:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buf = np.concatenate(self.chunks) if self.chunks else np.empty(0, np.uint32)
        dbuf = np.concatenate(self.doc_chunks) if self.bounds and self.doc_chunks else None
        n_full = buf.size // self.seq_len
        for i in range(n_full):
            sl = slice(i * self.seq_len, (i + 1) * self.seq_len)
            self._emit(buf[sl], None if dbuf is None else dbuf[sl], self.seq_len)
        rest = slice(n_full * self.seq_len, buf.size)
        self.chunks = [buf[rest]] if buf[rest].size else []
        self.doc_chunks = [dbuf[rest]] if dbuf is not None and dbuf[rest].size else []
        self.pending = buf[rest].size
        if final and self.pending:
            tail = np.full(self.seq_len, self.pad, dtype=np.uint32)
            tail[: self.pending] = buf[rest]
            dtail = None
            if dbuf is not None:
                dtail = np.full(self.seq_len, -1, dtype=np.int64)
                dtail[: self.pending] = dbuf[rest]
            self._emit(tail, dtail, self.pending)
            self.chunks, self.doc_chunks, self.pending = [], [], 0

    def _emit(self, tokens: np.ndarray, doc_nos: np.ndarray | None, length: int) -> None:
        # the document holding the sample's first token is its source (doc numbers are per split)
        source, doc_index = self.docs[self._first_doc]
        meta = {"source": source, "doc": doc_index, "length": int(length)}
        doc_ids = None
        if doc_nos is not None:
            doc_ids = np.where(doc_nos >= 0, doc_nos - doc_nos[0], -1).astype(np.int32)
        key = f"{self.split}-{self.samples:09d}"
        self.writer.write(key, np.ascontiguousarray(tokens), meta, doc_ids)
        self.samples += 1
        # advance the first-document pointer by the tokens just written
        self._consumed += length
        while self._first_doc < len(self.doc_lens) and self._consumed >= self.doc_lens[self._first_doc]:
            self._consumed -= self.doc_lens[self._first_doc]
            self._first_doc += 1

    def finish(self) -> dict:
        self._flush(final=True)
        shards = self.writer.close()
        return {
            "shards": shards,
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "documents": len(self.docs),
        }


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec)


def _encode_task(batch: list[tuple[str, str, int, str]]) -> tuple[list, list[list[int]]]:
    # texts are not sent back: only the (split, source, index) header and the ids
    return [(s, src, i, "") for s, src, i, _ in batch], _TOKENIZER.encode_batch([d[3] for d in batch])


def _ordered_bounded(pool, batches, max_in_flight: int):
    """Like pool.imap (results in input order, so shards do not depend on the worker count), but with
    at most ``max_in_flight`` batches queued: imap would read the whole corpus into memory up front."""
    in_flight: deque = deque()
    for batch in batches:
        in_flight.append(pool.apply_async(_encode_task, (batch,)))
        if len(in_flight) >= max_in_flight:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def _in_val(source: str, doc_index: int, ratio: float) -> bool:
    digest = hashlib.blake2b(f"{Path(source).name}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


def _doc_stream(files, val_files, text_key, val_ratio) -> Iterator[list[tuple[str, int, str, str]]]:
    """Batches of (split, source, doc_index, text)."""
    batch = []
    for path in files:
        for idx, text in iter_documents(path, text_key):
            if path in val_files:
                split = "valid"
            else:
                split = "valid" if val_ratio > 0 and _in_val(str(path), idx, val_ratio) else "train"
            batch.append((split, str(path), idx, text))
            if len(batch) >= DOCS_PER_TASK:
                yield batch
                batch = []
    if batch:
        yield batch


def tokenize_corpus(
    inputs: list[str],
    output: str | Path,
    tokenizer: str = "byte",
    seq_len: int = 2048,
    text_key: str = "text",
    val_ratio: float = 0.0,
    val_inputs: list[str] | None = None,
    workers: int | None = None,
    samples_per_shard: int | None = None,
    store_boundaries: bool = False,
    model_vocab_size: int | None = None,
    overwrite: bool = False,
    progress_every: float = 2.0,
) -> dict:
    """Tokenize ``inputs`` into shards under ``output``; returns the manifest (also written to disk)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    out = Path(output)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} exists; pass --overwrite to replace this dataset")
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tokenize-", dir=out))  # same file system: renames are atomic
    try:
        manifest = _tokenize_into(stage, out, inputs, tokenizer, seq_len, text_key, val_ratio, val_inputs, workers,
                                  samples_per_shard, store_boundaries, model_vocab_size, progress_every)
        _commit(stage, out, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _commit(stage: Path, out: Path, manifest: dict) -> None:
    """Replace the dataset in ``out`` by the complete one in ``stage``: the old manifest goes first (a
    reader then finds no dataset rather than a mixed one), the new shards move in, the new manifest
    is written, and only then are the old dataset's leftover shards deleted."""
    (out / MANIFEST).unlink(missing_ok=True)
    for f in stage.iterdir():
        os.replace(f, out / f.name)
    write_manifest(out, manifest)
    keep = {s[k] for info in manifest["splits"].values() for s in info["shards"] for k in ("name", "index")
            if s.get(k)}
    for stale in [*out.glob("*.tar"), *out.glob("*.idx.npz"), *out.glob(".*.tmp")]:
        if stale.name not in keep:
            stale.unlink()


def _tokenize_into(out: Path, dest: Path, inputs, tokenizer, seq_len, text_key, val_ratio, val_inputs, workers,
                   samples_per_shard, store_boundaries, model_vocab_size, progress_every) -> dict:
    """Tokenize into the (empty, staging) folder ``out`` for ``dest``; returns the manifest (not yet written)."""
    tok = load_tokenizer(tokenizer)
    check_vocab(tok.vocab_size, model_vocab_size, f"tokenizer {tok.name}")
    val_files = set(expand_inputs(val_inputs)) if val_inputs else set()
    files = sorted(set(expand_inputs(inputs)) | val_files)
    workers = workers or len(os.sched_getaffinity(0))
    if samples_per_shard is None:
        samples_per_shard = max(1, (128 << 20) // (4 * seq_len))  # ~128 MiB shards

    packers = {
        split: _Packer(
            split,
            AtomicShardWriter(out, split, samples_per_shard),
            seq_len,
            tok.eos_id,
            tok.pad_id,
            store_boundaries,
        )
        for split in ("train", "valid")
    }
    batches = _doc_stream(files, val_files, text_key, val_ratio)
    t0 = last = time.monotonic()
    n_docs = n_tokens = 0
    pool = None
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer),))
            pairs = _ordered_bounded(pool, batches, max_in_flight=4 * workers)
        else:
            pairs = ((b, tok.encode_batch([d[3] for d in b])) for b in batches)
        for batch, ids_list in pairs:
            for (split, source, idx, _), ids in zip(batch, ids_list):
                packer = packers[split]
                packer.add(source, idx, ids)
                n_docs += 1
                n_tokens += len(ids) + 1
            now = time.monotonic()
            if now - last >= progress_every:
                last = now
                print(
                    f"[tokenize] {n_docs} docs, {n_tokens} tokens, {n_tokens / (now - t0):,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
        splits = {name: p.finish() for name, p in packers.items()}
    except BaseException:
        for p in packers.values():
            p.writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if splits["train"]["samples"] == 0:
        raise ValueError(
            f"inputs {inputs}: no training documents (all went to validation or the corpus is empty)"
        )
    manifest = {
        "format": FORMAT,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "seq_len": seq_len,
        "dtype": "uint32",
        "boundaries": store_boundaries,
        "text_key": text_key,
        "val_ratio": val_ratio,
        "inputs": [str(f) for f in files],
        "splits": splits,
    }
    dt = time.monotonic() - t0
    print(
        f"[tokenize] done: {n_docs} docs, {n_tokens} tokens in {dt:.1f}s ({n_tokens / max(dt, 1e-9):,.0f} tokens/s); "
        f"train {splits['train']['samples']} samples / {len(splits['train']['shards'])} shards, "
        f"valid {splits['valid']['samples']} samples -> {dest}",
        file=sys.stderr,
        flush=True,
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="twotower-tokenize", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--input", nargs="+", required=True, help="files, directories or globs (.txt/.jsonl/.parquet)"
    )
    ap.add_argument("--output", required=True, help="output directory for shards and manifest.json")
    ap.add_argument(
        "--tokenizer", default="byte", help="'byte' or a local tokenizer.json / tokenizer directory"
    )
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    ap.add_argument("--val-ratio", type=float, default=0.0, help="fraction of documents sent to validation")
    ap.add_argument("--val-input", nargs="*", default=None, help="files sent whole to validation")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--shard-samples", type=int, default=None, help="samples per shard (default ~128 MiB)")
    ap.add_argument("--store-boundaries", action="store_true", help="also store per-token doc_ids.npy")
    ap.add_argument(
        "--model-vocab-size", type=int, default=None, help="fail if the tokenizer vocab exceeds it"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --output")
    args = ap.parse_args(argv)
    try:
        tokenize_corpus(
            args.input,
            args.output,
            args.tokenizer,
            args.seq_len,
            args.text_key,
            args.val_ratio,
            args.val_input,
            args.workers,
            args.shard_samples,
            args.store_boundaries,
            args.model_vocab_size,
            args.overwrite,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"twotower-tokenize: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
