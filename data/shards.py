"""Token shards on disk: writing, the manifest, reading and validating samples (stage: storage).

A tokenized dataset is a directory::

    manifest.json                 # see write_manifest(); the loader trusts its sample counts
    train-000000.tar ...          # webdataset shards
    valid-000000.tar ...

Each shard sample is ``{"__key__", "tokens.npy", "json"}`` (+ ``"doc_ids.npy"`` when document
boundaries are stored): ``tokens.npy`` is a uint32 array of exactly ``seq_len`` ids, padded with
``pad_id`` only in the last sample of a split; ``json`` holds the source file(s), the first
document index and ``length`` (the number of real, non-pad tokens). Shards are plain webdataset tars.

Next to each shard, ``<shard>.idx.npz`` records the byte offset of every sample's arrays inside the
tar (read back from the tar headers with ``tarfile`` after writing). The loader uses it to slice
samples straight out of a memory-mapped shard: Python's ``tarfile`` header parsing, which
webdataset's streaming reader relies on, costs ~1 ms per sample and would cap a worker at a few
MB/s. Shards without an index (written by other tools) are read with webdataset's tar iterator.
Each indexed sample's .npy header bytes are compared with the expected header (dtype, shape), and
any mismatch is re-decoded from its bytes to raise the precise error with shard and key.

Writes are atomic: a shard is written to ``.<name>.tmp`` and renamed once closed, and the manifest
is written last, so a crash never leaves a half-written shard under a name a reader would open.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "twotower-tokens/1"
TOKEN_DTYPES = (np.dtype("uint32"), np.dtype("int32"))


class DatasetError(ValueError):
    """A tokenized dataset that cannot be used (manifest, shard, index, resume state); the message
    names the file. ``twotower-train`` exits 5 on it, like on a bad checkpoint."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset directory, its manifest or a file the manifest lists does not exist."""


class BadSampleError(DatasetError):
    """A shard or sample that cannot be used; the message names the shard and key."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class AtomicShardWriter:
    """Writes ``{prefix}-{i:06d}.tar`` shards of ``samples_per_shard`` samples each, atomically."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._n = 0
        self._tokens = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._name = name
        self._tmp = self.out_dir / f".{name}.tmp"
        # mtime fixed: identical input gives byte-identical shards (and checksums)
        self._writer = wds.TarWriter(str(self._tmp), mtime=0.0)
        self._n = 0
        self._tokens = 0
        self._lengths: list[int] = []

    def write(self, key: str, tokens: np.ndarray, meta: dict, doc_ids: np.ndarray | None = None) -> None:
        if self._writer is None:
            self._open()
        sample = {"__key__": key, "tokens.npy": tokens, "json": meta}
        if doc_ids is not None:
            sample["doc_ids.npy"] = doc_ids
        self._writer.write(sample)
        self._n += 1
        self._tokens += int(meta["length"])
        self._lengths.append(int(meta["length"]))
        if self._n >= self.samples_per_shard:
            self._close()

    def _close(self) -> None:
        self._writer.close()
        final = self.out_dir / self._name
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        index_name = self._name[: -len(".tar")] + ".idx.npz"
        index_tmp = self.out_dir / f".{index_name}.tmp"
        with open(index_tmp, "wb") as f:
            np.savez(f, **build_index(self._tmp, self._lengths))
        os.replace(index_tmp, self.out_dir / index_name)
        os.replace(self._tmp, final)  # atomic on POSIX: readers see the whole shard or none
        self.shards.append(
            {
                "name": self._name,
                "index": index_name,
                "samples": self._n,
                "tokens": self._tokens,
                "bytes": size,
                "sha256": digest,
            }
        )
        self._writer = None

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close an open shard without publishing it (its ``.tmp`` file stays for the caller to remove)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, ValueError):
                pass
            self._writer = None


def build_index(tar_path: Path, lengths: list[int]) -> dict[str, np.ndarray]:
    """Offsets of every sample's ``tokens.npy`` (and ``doc_ids.npy``) data inside a tar, from its headers."""
    keys: list[str] = []
    tok: dict[str, tuple[int, int]] = {}
    doc: dict[str, tuple[int, int]] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            if ext == "tokens.npy":
                keys.append(key)
                tok[key] = (m.offset_data, m.size)
            elif ext == "doc_ids.npy":
                doc[key] = (m.offset_data, m.size)
    if len(keys) != len(lengths):
        raise BadSampleError(
            f"shard {tar_path}: {len(keys)} tokens.npy members but {len(lengths)} samples written"
        )
    return {
        "keys": np.array(keys),
        "tokens": np.array([tok[k] for k in keys], dtype=np.int64).reshape(-1, 2),
        "doc_ids": np.array([doc.get(k, (-1, 0)) for k in keys], dtype=np.int64).reshape(-1, 2),
        "length": np.array(lengths, dtype=np.int64),
        "tar_bytes": np.array(os.path.getsize(tar_path), dtype=np.int64),
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Atomically write ``manifest.json`` (after all shards exist)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | Path) -> dict:
    """Load and sanity-check ``manifest.json`` of a tokenized dataset directory.

    Raises :class:`DatasetNotFoundError` (no manifest, a listed shard or index missing) or
    :class:`DatasetError` (not JSON, another format, fields missing), naming the file."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(data_dir).exists() else "holds no manifest.json"
        raise DatasetNotFoundError(
            f"{path}: no manifest; {data_dir} {what}, so it is not a tokenized dataset "
            "(create it with twotower-tokenize)"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise DatasetError(
            f"{path}: not valid JSON{where}: {exc}; re-create the dataset with twotower-tokenize"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"{path}: format {found!r}, expected {FORMAT!r}")
    missing = [k for k in ("seq_len", "splits") if k not in manifest]
    if missing:
        raise DatasetError(f"{path}: missing field(s) {missing}; re-create the dataset with twotower-tokenize")
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for key in ("name", "index"):
                if shard.get(key) and not (Path(data_dir) / shard[key]).is_file():
                    raise DatasetNotFoundError(
                        f"{path}: split {split!r} lists {'shard' if key == 'name' else 'shard index'} "
                        f"{shard[key]} which is missing from {data_dir}; re-create the dataset"
                    )
    return manifest


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Raw webdataset samples of one tar; a corrupt or truncated tar raises naming shard and last key."""
    last_key = None
    try:
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            last_key = sample.get("__key__")
            yield sample
    except BadSampleError:
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, ...: webdataset re-raises with context
        where = f"after key {last_key!r}" if last_key else "before the first sample"
        raise BadSampleError(f"shard {path}: unreadable tar {where} ({type(exc).__name__}: {exc})") from exc


def _load_npy(raw: bytes, what: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:
        raise BadSampleError(f"{what}: not a valid .npy array ({exc})") from exc


def decode_sample(sample: dict, seq_len: int, vocab_size: int | None, with_doc_ids: bool) -> dict:
    """Raw sample -> ``{"tokens": uint32/int32 [seq_len], "length": int, "doc_ids"?}``; raises BadSampleError."""
    where = f"shard {sample.get('__url__')} key {sample.get('__key__')!r}"
    raw = sample.get("tokens.npy")
    if raw is None:
        raise BadSampleError(
            f"{where}: sample has no tokens.npy (has {sorted(k for k in sample if k[:2] != '__')})"
        )
    tokens = _load_npy(raw, f"{where} tokens.npy")
    if tokens.dtype not in TOKEN_DTYPES:
        raise BadSampleError(f"{where}: tokens.npy dtype {tokens.dtype}, expected uint32 or int32")
    if tokens.shape != (seq_len,):
        raise BadSampleError(f"{where}: tokens.npy shape {tokens.shape}, expected ({seq_len},) (seq_len)")
    if vocab_size is not None and tokens.size:
        hi, lo = int(tokens.max()), int(tokens.min())
        if hi >= vocab_size or lo < 0:
            bad = hi if hi >= vocab_size else lo
            raise BadSampleError(f"{where}: token id {bad} outside the model vocab [0, {vocab_size})")
    length = seq_len
    if "json" in sample:
        try:
            length = int(json.loads(sample["json"]).get("length", seq_len))
        except (ValueError, AttributeError) as exc:
            raise BadSampleError(f"{where}: unreadable json metadata ({exc})") from exc
    out = {"tokens": tokens, "length": length}
    if with_doc_ids:
        raw_ids = sample.get("doc_ids.npy")
        if raw_ids is None:
            raise BadSampleError(f"{where}: dataset stores boundaries but sample has no doc_ids.npy")
        doc_ids = _load_npy(raw_ids, f"{where} doc_ids.npy")
        if doc_ids.shape != (seq_len,):
            raise BadSampleError(f"{where}: doc_ids.npy shape {doc_ids.shape}, expected ({seq_len},)")
        out["doc_ids"] = doc_ids.astype(np.int64)
    return out


@dataclass(frozen=True)
class ShardInfo:
    """One shard of one split, as the loader sees it (path + sample count from the manifest)."""

    path: str
    samples: int
    index: str | None = None


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(n, dtype=dtype))
    return buf.getvalue()[: -n * dtype.itemsize]


class IndexedShard:
    """A memory-mapped shard read through its ``.idx.npz``; ``sample(j)`` decodes and validates sample j."""

    def __init__(
        self, path: str, index: str, samples: int, seq_len: int, vocab_size: int | None, with_doc_ids: bool
    ):
        self.path, self.seq_len, self.vocab_size, self.with_doc_ids = path, seq_len, vocab_size, with_doc_ids
        try:
            with np.load(index, allow_pickle=False) as z:
                self.keys, self.tok, self.doc, self.length = z["keys"], z["tokens"], z["doc_ids"], z["length"]
                tar_bytes = int(z["tar_bytes"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BadSampleError(
                f"shard {path}: unreadable index {index} ({type(exc).__name__}: {exc}); it was truncated "
                "or modified after tokenization: re-create the dataset"
            ) from exc
        size = os.path.getsize(path)
        if size != tar_bytes:
            raise BadSampleError(
                f"shard {path}: {size} bytes but {tar_bytes} when indexed; the tar was truncated "
                "or modified after tokenization"
            )
        if len(self.keys) != samples:
            raise BadSampleError(f"shard {path}: index lists {len(self.keys)} samples, manifest {samples}")
        # mmap + frombuffer rather than np.memmap: slicing a plain ndarray is ~3x cheaper per sample
        if size:
            with open(path, "rb") as f:
                self.data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        else:
            self.data = np.zeros(0, np.uint8)
        self.headers = {_npy_header(np.dtype(d), seq_len): np.dtype(d) for d in TOKEN_DTYPES}

    def _raw(self, j: int) -> dict:
        """Sample j as webdataset would give it (bytes per extension): for precise error messages."""
        off, n = self.tok[j]
        raw = {
            "__key__": str(self.keys[j]),
            "__url__": self.path,
            "tokens.npy": self.data[off : off + n].tobytes(),
            "json": json.dumps({"length": int(self.length[j])}).encode(),
        }
        if self.doc[j][0] >= 0:
            off, n = self.doc[j]
            raw["doc_ids.npy"] = self.data[off : off + n].tobytes()
        return raw

    def samples(self, js: list[int]) -> list[dict | None]:
        """Fast path for many samples: headers and vocab checked with a few numpy ops per dtype group.

        Entry ``i`` is sample ``js[i]`` as :meth:`sample` returns it, or None where that sample needs
        the per-sample path (a bad header, an out-of-vocab id, doc ids), which then raises or decodes.
        """
        out: list[dict | None] = [None] * len(js)
        if not js or self.with_doc_ids or not self.data.size:
            return out
        jj = np.asarray(js, dtype=np.int64)
        offs, sizes = self.tok[jj, 0], self.tok[jj, 1]
        for header, dtype in self.headers.items():
            h = len(header)
            nbytes = h + self.seq_len * dtype.itemsize
            cand = np.flatnonzero((sizes == nbytes) & (offs >= 0) & (offs + nbytes <= self.data.size))
            if not cand.size:
                continue
            heads = self.data[offs[cand, None] + np.arange(h)]
            cand = cand[(heads == np.frombuffer(header, np.uint8)).all(axis=1)]
            if not cand.size:
                continue
            starts = offs[cand] + h
            step = int(starts[1] - starts[0]) if cand.size > 1 else nbytes
            if step >= nbytes and (np.diff(starts) == step).all() and starts[0] % dtype.itemsize == 0:
                # evenly spaced samples (fixed-size records): one strided view over the mmap
                rows = np.ndarray(
                    (cand.size, self.seq_len), dtype, self.data, int(starts[0]), (step, dtype.itemsize)
                )
            else:
                rows = [np.frombuffer(self.data, dtype, self.seq_len, int(o)) for o in starts]
                rows = np.stack(rows) if rows else np.zeros((0, self.seq_len), dtype)
            good = np.ones(cand.size, dtype=bool)
            if self.vocab_size is not None and self.seq_len:
                good &= rows.max(axis=1) < self.vocab_size
                if dtype.kind == "i":
                    good &= rows.min(axis=1) >= 0
            lengths = self.length[jj[cand]].tolist()
            for i, c in enumerate(cand.tolist()):
                if good[i]:
                    out[c] = {"tokens": rows[i], "length": lengths[i]}
        return out

    def sample(self, j: int) -> dict:
        off, n = (int(x) for x in self.tok[j])
        for header, dtype in self.headers.items():
            if (
                n == len(header) + self.seq_len * dtype.itemsize
                and self.data[off : off + len(header)].tobytes() == header
            ):
                break
        else:  # not the expected dtype/shape: decode the bytes for the exact complaint
            return decode_sample(self._raw(j), self.seq_len, self.vocab_size, self.with_doc_ids)
        tokens = np.frombuffer(self.data, dtype, self.seq_len, off + len(header))
        if self.vocab_size is not None:
            hi = int(tokens.max())
            lo = int(tokens.min()) if dtype.kind == "i" else 0
            if hi >= self.vocab_size or lo < 0:
                bad = hi if hi >= self.vocab_size else lo
                raise BadSampleError(
                    f"shard {self.path} key {str(self.keys[j])!r}: token id {bad} outside the model "
                    f"vocab [0, {self.vocab_size})"
                )
        # a read-only view into the page cache; the collate step makes the single int64 copy
        out = {"tokens": tokens, "length": int(self.length[j])}
        if self.with_doc_ids:
            if self.doc[j][0] < 0:
                return decode_sample(self._raw(j), self.seq_len, self.vocab_size, self.with_doc_ids)
            out["doc_ids"] = decode_sample(self._raw(j), self.seq_len, None, True)["doc_ids"]
        return out
