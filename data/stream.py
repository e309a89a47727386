"""Deterministic, seekable sample streams for one reader slot (stage: loading, inside a worker).

Input: the shard list of a tokenized dataset (paths + sample counts from its manifest), the slot
(``dp_rank * num_workers + worker``) out of ``dp_size * num_workers`` slots, a seed.
Output: an iterator of decoded samples that is a pure function of ``(seed, slot, n_slots, position)``.

Why not ``wds.shuffle``: its buffer is random state that cannot be saved, so a resumed run could only
replay the whole epoch. Here every random choice is derived from a counter-based seed, so a stream
can start at any position after reading at most one shard prefix:

* epoch ``e``: the shard list is permuted with ``rng(seed, dataset, e)`` and slot ``s`` takes
  ``perm[s::n_slots]`` (a fresh split every epoch, so uneven shard counts average out);
* the slot's samples of the epoch, in that shard order, are cut into blocks of ``shuffle_buffer``
  samples and each block is emitted in the order ``rng(seed, dataset, e, slot, block).permutation``.

So position ``n`` maps to (epoch, block, offset) by arithmetic on the manifest's sample counts.
When a dataset has fewer shards than slots, each shard is split into ``k`` interleaved virtual shards
(sample ``j`` goes to part ``j % k``): every slot gets data, at the price of reading whole shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from twotower.data.shards import BadSampleError, ShardInfo, iter_shard

log = logging.getLogger(__name__)

_END = object()
BLEND_CHUNK = 4096  # blend choices are drawn in seeded chunks, so position n needs n/4096 draws to replay


def rng(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (counter-based seeding, no hidden state)."""
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class VShard:
    """Samples ``part, part + stride, ...`` of one shard file."""

    path: str
    part: int
    stride: int
    samples: int
    index: str | None
    total: int  # samples in the whole shard


def virtual_shards(shards: list[ShardInfo], n_slots: int, name: str) -> list[VShard]:
    if not shards:
        raise ValueError(f"dataset {name}: no shards")
    k = -(-n_slots // len(shards)) if len(shards) < n_slots else 1
    out = [
        VShard(s.path, p, k, len(range(p, s.samples, k)), s.index, s.samples)
        for s in shards
        for p in range(k)
    ]
    if any(v.samples == 0 for v in out):
        raise ValueError(
            f"dataset {name}: {sum(s.samples for s in shards)} samples in {len(shards)} shards cannot feed "
            f"{n_slots} reader slots (dp_size x num_workers); use fewer workers or re-tokenize with more "
            "and smaller shards (--shard-samples)"
        )
    if k > 1:
        log.info(
            "dataset %s: %d shards < %d slots, each shard is read by %d slots", name, len(shards), n_slots, k
        )
    return out


class SlotStream:
    """The sample stream of one dataset for one slot; ``iterate(position)`` seeks then streams."""

    def __init__(
        self,
        vshards: list[VShard],
        *,
        slot: int,
        n_slots: int,
        seed: int,
        dataset_index: int,
        shuffle: bool,
        block: int,
        finite: bool,
        base_epoch: int,
        decode: Callable[[dict | tuple], dict | None],
        open_indexed: Callable[[VShard], object] | None = None,
    ):
        self.vshards, self.slot, self.n_slots = vshards, slot, n_slots
        self.seed, self.ds, self.shuffle, self.block = seed, dataset_index, shuffle, max(1, block)
        self.finite, self.base_epoch, self.decode = finite, base_epoch, decode
        self.open_indexed = open_indexed
        self._cursor: tuple[int, int, int, Iterator] | None = None  # (epoch, vshard idx, next offset, iter)

    def assignment(self, epoch: int) -> list[int]:
        """Indices of the vshards this slot reads in ``epoch``, in reading order."""
        n = len(self.vshards)
        order = rng(self.seed, 1, self.ds, epoch).permutation(n) if self.shuffle else np.arange(n)
        return [int(i) for i in order[self.slot :: self.n_slots]]

    def epoch_total(self, epoch: int) -> int:
        return sum(self.vshards[i].samples for i in self.assignment(epoch))

    def locate(self, position: int) -> tuple[int, int]:
        """Position in the stream -> (epoch, offset within the epoch); epoch is None past a finite end."""
        epoch = self.base_epoch
        while True:
            total = self.epoch_total(epoch)
            if position < total or (self.finite and epoch == self.base_epoch and position == total):
                return epoch, position
            if self.finite:
                return None, 0
            if total == 0 and all(self.epoch_total(epoch + i) == 0 for i in range(1, 4)):
                raise ValueError(f"slot {self.slot}: no samples assigned in epochs {epoch}..{epoch + 3}")
            position -= total
            epoch += 1

    def iterate(self, position: int) -> Iterator[dict | None]:
        epoch, offset = self.locate(position)
        if epoch is None:
            return
        while True:
            total = self.epoch_total(epoch)
            b = offset // self.block
            while b * self.block < total:
                lo, hi = b * self.block, min((b + 1) * self.block, total)
                items = self._read(epoch, lo, hi)
                if self.shuffle:
                    order = rng(self.seed, 2, self.ds, epoch, self.slot, b).permutation(hi - lo)
                else:
                    order = np.arange(hi - lo)
                start = offset - lo if offset > lo else 0
                for j in list(order)[start:]:
                    yield items[j]
                b += 1
            offset = 0
            epoch += 1
            self._cursor = None
            if self.finite:
                return

    def _read(self, epoch: int, lo: int, hi: int) -> list[dict | None]:
        """Decoded samples ``lo..hi`` of this slot's epoch (a window of its vshards in reading order)."""
        assign = self.assignment(epoch)
        out: list[dict | None] = []
        pos = lo
        while pos < hi:
            # find the vshard holding `pos`
            acc = 0
            for k, vi in enumerate(assign):
                n = self.vshards[vi].samples
                if pos < acc + n:
                    break
                acc += n
            offset = pos - acc
            it = self._open(epoch, k, assign[k], offset)
            take = min(hi - pos, self.vshards[assign[k]].samples - offset)
            if isinstance(it, _IndexedIter):  # decode the whole window at once (same samples, same order)
                out.extend(it.take(take))
                pos += take
                self._cursor = (epoch, k, offset + take, it)
                continue
            for i in range(take):
                item = next(it, _END)
                if item is _END:
                    v = self.vshards[assign[k]]
                    raise BadSampleError(
                        f"shard {v.path}: ended after {offset + i} of the {v.samples} samples the manifest "
                        f"lists (part {v.part}/{v.stride}); it was truncated or replaced after tokenization"
                    )
                out.append(item)
            pos += take
            self._cursor = (epoch, k, offset + take, it)
        return out

    def _open(self, epoch: int, k: int, vi: int, offset: int) -> Iterator[dict | None]:
        # consecutive blocks continue the open tar instead of re-reading its prefix
        if self._cursor is not None and self._cursor[:3] == (epoch, k, offset):
            return self._cursor[3]
        v = self.vshards[vi]
        return self._vshard_iter(v, offset)

    def _vshard_iter(self, v: VShard, offset: int) -> Iterator[dict | None]:
        if v.index is not None and self.open_indexed is not None:
            js = range(v.part + offset * v.stride, v.total, v.stride)
            return _IndexedIter(self.open_indexed(v), js, self.decode)
        return self._tar_iter(v, offset)

    def _tar_iter(self, v: VShard, offset: int) -> Iterator[dict | None]:
        kept = 0
        for j, raw in enumerate(iter_shard(v.path)):
            if j % v.stride != v.part:
                continue
            if kept >= offset:  # skipped samples are not decoded
                yield self.decode(raw)
            kept += 1


class _IndexedIter:
    """Samples of an indexed vshard; ``take(n)`` decodes the next ``n`` in one batched call."""

    def __init__(self, shard, js: range, decode):
        self.shard, self.js, self.i, self.decode = shard, js, 0, decode

    def __iter__(self):
        return self

    def __next__(self) -> dict | None:
        if self.i >= len(self.js):
            raise StopIteration
        return self.take(1)[0]

    def take(self, n: int) -> list[dict | None]:
        js = list(self.js[self.i : self.i + n])
        self.i += len(js)
        many = getattr(self.decode, "many", None)
        if many is None:
            return [self.decode((self.shard, j)) for j in js]
        return many(self.shard, js)


class BlendSampler:
    """Which dataset each draw of a slot comes from; draw ``i`` is a pure function of (seed, slot, i)."""

    def __init__(self, weights: list[float], seed: int, slot: int):
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.seed, self.slot = seed, slot

    def _chunk(self, c: int) -> np.ndarray:
        if len(self.p) == 1:
            return np.zeros(BLEND_CHUNK, dtype=np.int64)
        return rng(self.seed, 3, self.slot, c).choice(len(self.p), size=BLEND_CHUNK, p=self.p)

    def counts_before(self, n: int) -> list[int]:
        """How many of the first ``n`` draws went to each dataset."""
        counts = np.zeros(len(self.p), dtype=np.int64)
        full, rest = divmod(n, BLEND_CHUNK)
        for c in range(full):
            counts += np.bincount(self._chunk(c), minlength=len(self.p))
        if rest:
            counts += np.bincount(self._chunk(full)[:rest], minlength=len(self.p))
        return [int(x) for x in counts]

    def draws(self, start: int) -> Iterator[int]:
        c, off = divmod(start, BLEND_CHUNK)
        while True:
            for d in self._chunk(c)[off:]:
                yield int(d)
            c, off = c + 1, 0
