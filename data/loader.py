"""Streaming token loader with exact resume (stage: training input).

Input: a :class:`DataConfig` (tokenized datasets + blend weights), ``dp_rank``/``dp_size``,
``micro_batch_size``. Output: an iterator of batches
``{"tokens": int64 [B, seq_len], "loss_mask": bool [B, seq_len]}`` (+ ``"doc_ids"`` int64 when every
dataset stores document boundaries; -1 on padding). ``loss_mask`` is False only on padding, which
exists only in the last sample of a split.

How it is exact. Each DataLoader worker ``w`` of rank ``r`` is reader slot ``r * W + w`` of
``dp_size * W`` slots; its samples are a pure function of the seed and its position (data/stream.py).
The worker reads shards (memory-mapped through the shard's offset index, or with webdataset's tar
iterator for shards without one; data/shards.py), decodes and validates samples, draws the dataset of each
sample from a seeded blend, batches ``micro_batch_size`` samples and tags the batch with its slot
and position. torch's DataLoader hands batches out round-robin over workers (skipping exhausted
workers), so the main process records, per worker, the position after the last batch *delivered*
(prefetched batches do not count) and which worker is next. ``load_state_dict`` restarts every
worker at its recorded position and rotates worker ids so that the worker that was next is asked
first: the following batches are exactly those of an uninterrupted run.

State (``state_dict()``) is a small JSON-serialisable dict. With ``on_bad_sample: error`` it is the
same on every rank, so saving rank 0's copy is enough. If dp_size, num_workers or micro_batch_size
change, slots cannot be mapped one to one; ``DataConfig.on_dp_change`` decides (default: warn and
restart the oldest epoch in progress with the new layout; nothing is skipped, see config.py). The
state names its datasets by path (and a fingerprint of their shards): a dataset that moved resumes
only with ``DataConfig.on_path_change: by_position`` and the same shards; any other mismatch raises
:class:`DatasetError` (``twotower-train`` exits 5), as do bad manifests, shards and samples.

Workers ignore SIGTERM / SIGUSR1 (the trainer decides when to stop and ends them) and are killed by
the kernel when this process dies (data/workers.py).

Throughput (tests/benchmarks/bench_loader.py, 2 CPU cores, seq_len 4096, page-cached shards): ~380M
tokens/s in-process (num_workers=0, ~0.5x a plain np.fromfile, which writes half the bytes of the
int64 batches) and ~80M tokens/s with workers, where the pipe to the main process is the limit:
thousands of times what a training rank consumes. Workers pay off when shards come from a slow or
remote file system.

Validation (``split="valid"``): one pass, no shuffling, no blend, the same batches on every run for
a given dp_size; every ``iter()`` starts the pass from the beginning.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower.data.config import DataConfig
from twotower.data.plan import Decoder, ReadPlan
from twotower.data.shards import DatasetError
from twotower.data.stream import BlendSampler, SlotStream
from twotower.data.workers import WorkerInit, stop_signals_blocked

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _SlotDataset(IterableDataset):
    """Runs inside each DataLoader worker: blends the slot's streams and yields tagged batches."""

    def __init__(
        self,
        plan: ReadPlan,
        dp_rank: int,
        batch_size: int,
        positions: list[int],
        rotation: int,
        base_epochs: list[int],
    ):
        self.plan, self.dp_rank, self.batch_size = plan, dp_rank, batch_size
        self.positions, self.rotation, self.base_epochs = positions, rotation, base_epochs

    def __iter__(self):
        info = get_worker_info()
        W = self.plan.W
        logical = ((info.id if info else 0) + self.rotation) % W
        slot = self.dp_rank * W + logical
        cfg = self.plan.cfg
        decode = Decoder(cfg.seq_len, cfg.vocab_size, self.plan.with_doc_ids, cfg.on_bad_sample == "skip")
        streams = self.plan.streams(slot, self.base_epochs, decode)
        blend = BlendSampler(self.plan.weights, cfg.seed, slot)
        pos = self.positions[logical]
        iters = [s.iterate(c) for s, c in zip(streams, blend.counts_before(pos))]
        batch: list[dict] = []
        for d in blend.draws(pos):
            sample = next(iters[d], StopIteration)
            if sample is StopIteration:  # finite (validation) stream exhausted
                break
            pos += 1
            if sample is not None:  # None: a bad sample skipped (and logged) in skip mode
                batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch, logical, pos)
                batch = []
        if batch:
            yield self._collate(batch, logical, pos)

    def _collate(self, batch: list[dict], logical: int, pos: int) -> dict:
        # Batches cross the process boundary as compact numpy arrays (pickled through the worker's pipe:
        # measured several times faster than torch's per-tensor shared-memory segments for batches
        # this size); TokenLoader.__next__ widens them to int64 tensors.
        # in-process (num_workers=0) there is no pipe: widen to int64 in the same single copy
        signed = self.plan.cfg.num_workers == 0 or any(s["tokens"].dtype.kind == "i" for s in batch)
        arr = np.empty((len(batch), self.plan.cfg.seq_len), dtype=np.int64 if signed else np.uint32)
        lengths = np.empty(len(batch), dtype=np.int64)
        for i, s in enumerate(batch):
            arr[i] = s["tokens"]  # the one copy out of the page cache
            lengths[i] = s["length"]
        out = {
            "tokens": arr,
            "lengths": lengths,
            "_worker": logical,
            "_position": pos,
        }
        if self.plan.with_doc_ids:
            out["doc_ids"] = np.stack([s["doc_ids"] for s in batch]).astype(np.int32)
        return out


def _identity(batch: dict) -> dict:
    return batch  # keep numpy arrays as they are: conversion happens after the pipe (see _collate)


def _to_torch(batch: dict) -> dict:
    tokens = batch["tokens"].astype(np.int64, copy=False)
    # numpy, not torch: a torch op this size goes multi-threaded, which stalls on busy cores
    mask = np.arange(tokens.shape[1])[None, :] < batch["lengths"][:, None]
    out = {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}
    if "doc_ids" in batch:
        out["doc_ids"] = torch.from_numpy(batch["doc_ids"].astype(np.int64))
    return out


class TokenLoader:
    """Batches for one data-parallel rank, with exact ``state_dict()`` / ``load_state_dict()``."""

    def __init__(
        self,
        cfg: DataConfig | Any,
        dp_rank: int = 0,
        dp_size: int = 1,
        micro_batch_size: int = 1,
        seed: int | None = None,
        split: str = "train",
        one_pass: bool = False,
    ):
        cfg = DataConfig.from_any(cfg)
        if seed is not None and seed != cfg.seed:
            cfg = DataConfig.from_any({**cfg.__dict__, "seed": seed})
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if split == "valid" and not cfg.valid_path:
            raise ValueError("DataConfig.valid_path is not set: no validation stream")
        self.cfg, self.dp_rank, self.dp_size, self.batch_size, self.split = (
            cfg,
            dp_rank,
            dp_size,
            micro_batch_size,
            split,
        )
        self.one_pass = one_pass  # train split only: stop after each slot's first epoch (tests, evals)
        self.plan = ReadPlan(cfg, split, dp_size, one_pass)
        self._reset_state()

    def _reset_state(self) -> None:
        W = self.plan.W
        self.positions = [0] * W
        self.batches = [0] * W
        self.next_worker = 0
        self.base_epochs = [0] * len(self.plan.names)
        self._it = None

    def _make_iter(self):
        ds = _SlotDataset(
            self.plan,
            self.dp_rank,
            self.batch_size,
            list(self.positions),
            self.next_worker,
            list(self.base_epochs),
        )
        nw = self.cfg.num_workers
        if nw == 0:  # what DataLoader(num_workers=0, batch_size=None, identity collate) does, minus its overhead
            return iter(ds)
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=nw,
            collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor if nw else None,
            persistent_workers=False,
            # workers ignore the scheduler's SIGTERM/SIGUSR1 (the trainer stops, saves, and ends
            # them) and die with this process (data/workers.py)
            worker_init_fn=WorkerInit(os.getpid()),
        )
        with stop_signals_blocked():  # no window between fork and WorkerInit
            return iter(dl)

    def __iter__(self):
        if self.split == "valid" or self.one_pass:
            # a finite pass: every iter() starts a fresh, identical pass (a separate generator, so a
            # for-loop over an already started iterator does not restart it)
            self._reset_state()
            return self._pass()
        return self  # training: iterating continues from the current (possibly restored) state

    def _pass(self):
        while True:
            try:
                yield next(self)
            except StopIteration:
                return

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._make_iter()
        try:
            batch = next(self._it)
        except StopIteration:
            # end of a finite (validation) pass: the next iter() starts the same pass again
            self._reset_state()
            raise
        except DatasetError as exc:  # from a worker: torch wraps the message in the worker's traceback
            self._close_workers()  # now: torch's re-raise keeps the iterator in a cycle until a gc
            raise type(exc)(_worker_message(exc)) from None
        w = batch["_worker"]
        self.positions[w] = int(batch["_position"])
        self.batches[w] += 1
        self.next_worker = (w + 1) % self.plan.W
        return _to_torch(batch)

    def _close_workers(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's DataLoader iterator (workers)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "dp_size": self.dp_size,
            "num_workers": self.cfg.num_workers,
            "micro_batch_size": self.batch_size,
            "seed": self.cfg.seed,
            "datasets": [[n, w] for n, w in zip(self.plan.names, self.plan.weights)],
            "fingerprints": list(self.plan.fingerprints),
            "base_epochs": list(self.base_epochs),
            "positions": list(self.positions),
            "batches": list(self.batches),
            "next_worker": self.next_worker,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (call before iterating).

        A state that cannot continue this loader (another version, split, seed or blend) raises
        :class:`DatasetError` saying which and what to change."""
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["split"] != self.split:
            raise DatasetError(
                f"loader state is for split {state['split']!r}, this loader reads {self.split!r}"
            )
        if state["seed"] != self.cfg.seed:
            raise DatasetError(
                f"loader state seed {state['seed']} != data seed {self.cfg.seed}; keep the seed on resume"
            )
        saved = [d[0] for d in state["datasets"]]
        if saved != self.plan.names:
            self._follow_moved(saved, state.get("fingerprints"))
        self._it = None
        same = (state["dp_size"], state["num_workers"], state["micro_batch_size"]) == (
            self.dp_size,
            self.cfg.num_workers,
            self.batch_size,
        )
        if same:
            self.positions = list(state["positions"])
            self.batches = list(state["batches"])
            self.next_worker = int(state["next_worker"])
            self.base_epochs = list(state["base_epochs"])
            return
        self._relayout(state)

    def _relayout(self, state: dict) -> None:
        """Layout changed: per dataset, find the epoch of every old slot and restart cleanly."""
        msg = (
            f"data layout changed on resume: dp_size {state['dp_size']}->{self.dp_size}, num_workers "
            f"{state['num_workers']}->{self.cfg.num_workers}, micro_batch_size {state['micro_batch_size']}->"
            f"{self.batch_size}"
        )
        if self.cfg.on_dp_change == "error":
            raise DatasetError(msg + "; set data.on_dp_change to restart_epoch or next_epoch to continue")
        old_W = max(1, state["num_workers"])
        old_plan = ReadPlan(self.cfg, self.split, state["dp_size"])
        old_plan.W = old_W
        old_plan.layout_vshards(state["dp_size"])
        new_base = []
        for d, name in enumerate(self.plan.names):
            where = []  # (epoch, offset) of every old slot; ranks share positions (see module doc)
            for r in range(state["dp_size"]):
                for w in range(old_W):
                    slot = r * old_W + w
                    count = BlendSampler(old_plan.weights, self.cfg.seed, slot).counts_before(
                        state["positions"][w]
                    )[d]
                    stream = old_plan.streams(slot, state["base_epochs"], None)[d]
                    where.append((stream, count, stream.locate(count)))
            epochs = [loc[0] for _, _, loc in where]
            if self.cfg.on_dp_change == "restart_epoch":
                target = min(epochs)
                repeated = sum(c - _pos_of_epoch(s, target) for s, c, _ in where)
                note = f"restarting epoch {target}: {repeated} samples of it are seen a second time"
            else:
                target = max(epochs) + 1
                skipped = sum(_pos_of_epoch(s, target) - c for s, c, _ in where)
                note = f"starting epoch {target}: {skipped} unread samples of earlier epochs are skipped"
            warnings.warn(
                f"{msg}. Dataset {name}: old slots were in epochs {sorted(set(epochs))}; {note}.",
                stacklevel=3,
            )
            new_base.append(target)
        self._reset_state()
        self.base_epochs = new_base

    def _follow_moved(self, saved: list[str], fingerprints: list[str] | None) -> None:
        """The saved state names other dataset paths: resume only if the datasets moved (same
        contents, same order) and ``data.on_path_change=by_position`` says so."""
        now = self.plan.names
        moved = ", ".join(f"{a} -> {b}" for a, b in zip(saved, now) if a != b)
        if len(saved) != len(now) or self.cfg.on_path_change != "by_position":
            hint = (f"if the datasets moved ({moved}) with the same contents, set data.on_path_change=by_position; "
                    if len(saved) == len(now) else "")
            raise DatasetError(
                f"the checkpoint's loader state reads datasets {saved}, data.train reads {now}: {hint}a changed "
                "blend cannot resume exactly (point checkpoint.dir elsewhere or use checkpoint.resume=none)"
            )
        if fingerprints is None:
            warnings.warn(f"data.on_path_change=by_position: {moved}; the saved state records no dataset "
                          "fingerprints, so the contents are not compared", stacklevel=3)
            return
        differ = [f"{a} -> {b}" for a, b, fa, fb in zip(saved, now, fingerprints, self.plan.fingerprints) if fa != fb]
        if differ:
            raise DatasetError(
                f"data.on_path_change=by_position: {', '.join(differ)}: the dataset now there has other shards "
                "(names, sample counts or checksums in its manifest.json) than the checkpoint's; a re-tokenized "
                "dataset cannot resume exactly (point checkpoint.dir elsewhere or use checkpoint.resume=none)"
            )
        log.warning("data.on_path_change=by_position: resuming the data position of moved datasets: %s", moved)


def _worker_message(exc: Exception) -> str:
    """The original message of an exception re-raised from a DataLoader worker (without torch's
    'Caught X in DataLoader worker process N. Original Traceback ...' wrapper)."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if text.startswith("Caught ") and marker in text:
        return text[text.rindex(marker) + len(marker):].strip()
    return text


def _pos_of_epoch(stream: SlotStream, epoch: int) -> int:
    """Stream position at which ``epoch`` begins."""
    return sum(stream.epoch_total(e) for e in range(stream.base_epoch, epoch))


def build_train_loader(
    cfg: DataConfig | Any, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int | None = None
) -> TokenLoader:
    """The training stream (infinite, shuffled, blended, resumable)."""
    return TokenLoader(cfg, dp_rank, dp_size, micro_batch_size, seed, split="train")


def build_valid_loader(
    cfg: DataConfig | Any, dp_rank: int, dp_size: int, micro_batch_size: int
) -> TokenLoader:
    """The validation stream: one fixed, unshuffled pass over ``valid_path``'s valid split per iter()."""
    return TokenLoader(cfg, dp_rank, dp_size, micro_batch_size, split="valid")
