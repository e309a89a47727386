"""Loader throughput vs a plain sequential numpy read of the same shard bytes (prints ratios).

Stage: benchmark (not collected by pytest). Input: none (writes a synthetic tokenized dataset of
random uint32 tokens to a temp dir, ~``--mb`` MB). Output: tokens/s of

* ``numpy``: ``np.fromfile`` of every shard, sequentially (the bytes are in the page cache after a
  warm-up read, so this is a memory-bandwidth upper bound, with no tar parsing or validation);
* ``loader``: one pass of :class:`TokenLoader` (webdataset tar parsing, .npy decode, dtype / length /
  vocab validation, block shuffle, int64 batches through torch DataLoader workers);

and their ratio, plus the margin over what a training rank consumes (``--train-tokens-per-s``).

Run: ``python tests/benchmarks/bench_loader.py [--workers 2] [--seq-len 4096] [--mb 256]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from twotower.data.config import DataConfig
from twotower.data.loader import TokenLoader
from twotower.data.shards import FORMAT, AtomicShardWriter, write_manifest


def make_dataset(out: Path, seq_len: int, mb: int, shards: int, vocab: int) -> int:
    n = max(shards, (mb << 20) // (4 * seq_len))
    w = AtomicShardWriter(out, "train", samples_per_shard=-(-n // shards))
    rng = np.random.default_rng(0)
    for i in range(n):
        w.write(f"train-{i:09d}", rng.integers(0, vocab, seq_len, dtype=np.uint32), {"length": seq_len})
    info = w.close()
    split = {"shards": info, "samples": n, "tokens": n * seq_len}
    write_manifest(
        out,
        {
            "format": FORMAT,
            "tokenizer": "random",
            "vocab_size": vocab,
            "eos_id": 2,
            "pad_id": 0,
            "seq_len": seq_len,
            "dtype": "uint32",
            "boundaries": False,
            "splits": {"train": split, "valid": {"shards": [], "samples": 0, "tokens": 0}},
        },
    )
    return n * seq_len


def numpy_read(out: Path) -> float:
    t = time.perf_counter()
    total = 0
    for p in sorted(out.glob("train-*.tar")):
        total += np.fromfile(p, dtype=np.uint32).size
    return time.perf_counter() - t


def loader_read(out: Path, seq_len: int, vocab: int, workers: int, batch: int) -> tuple[float, float, int]:
    """(total seconds, steady-state seconds after the first batch, tokens); startup = worker fork + imports."""
    cfg = DataConfig(
        train=[{"path": str(out)}],
        seq_len=seq_len,
        num_workers=workers,
        shuffle_buffer=1024,
        vocab_size=vocab,
        prefetch_factor=4,
    )
    t = time.perf_counter()
    it = iter(TokenLoader(cfg, 0, 1, batch, one_pass=True))
    n = next(it)["tokens"].numel()
    t1, n1 = time.perf_counter(), n
    n += sum(b["tokens"].numel() for b in it)
    end = time.perf_counter()
    return end - t, (end - t1) * n / (n - n1), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument(
        "--train-tokens-per-s",
        type=float,
        default=20_000.0,
        help="tokens/s one training rank consumes (default: ~H100 rate for a 3.6B-active MoE)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tokens = make_dataset(out, args.seq_len, args.mb, args.shards, args.vocab)
        numpy_read(out)  # warm the page cache so both sides read from memory
        t_np = min(numpy_read(out) for _ in range(3))
        print(f"dataset: {tokens:,} tokens, seq_len {args.seq_len}, {args.shards} shards")
        print(f"numpy sequential read: {tokens / t_np:,.0f} tokens/s")
        for w in args.workers:
            t_l, t_steady, n = loader_read(out, args.seq_len, args.vocab, w, args.batch)
            assert n == tokens, (n, tokens)
            rate, steady = tokens / t_l, tokens / t_steady
            print(
                f"loader num_workers={w}: {rate:,.0f} tokens/s incl. startup = {rate / (tokens / t_np):.2f}x numpy; "
                f"steady state {steady:,.0f} tokens/s = {steady / (tokens / t_np):.2f}x numpy, "
                f"{steady / args.train_tokens_per_s:,.0f}x a training rank's {args.train_tokens_per_s:,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
