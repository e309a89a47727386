"""Checkpoint integrity: a manifest of every file's size and CRC-32, written at save, checked at load;
the small files read with their name attached; why a save failed (disk full, read-only directory).

Stage: inside :class:`~twotower.training.checkpoint.Checkpointer` (save: after every rank wrote its
files and before the ``COMPLETE`` marker; load: before any tensor is read).

``{checkpoint}/manifest.json``::

    {"format": 1, "checksum": "crc32", "files": {"__0_0.distcp": [size, crc32], "rng/rank_00001.pt": ...}}

Every rank hashes the files it wrote itself (its ``__{rank}_*.distcp`` shards and its RNG file:
they are in its page cache, and the work is spread over the ranks); the entries travel to rank 0
with one object all-gather, and rank 0 hashes whatever else is in the folder (``.metadata``,
``common.pt``, ``metadata.json``, ``scheduler.pt``, ``extra.json``), so a file written by any rank
under any name is covered. At load every rank checks its round-robin share of the entries (size,
then CRC-32 when ``checksums``), and the findings are all-gathered, so every rank reaches the same
verdict (a damaged file seen by one rank must not leave the others waiting in a collective).

Functions on paths plus :func:`all_gather`, and the checkpoint errors (re-exported by checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT = 1
_CHUNK = 8 << 20
#: Not covered by the manifest: the manifest itself and the marker written after it.
_UNLISTED = {MANIFEST, COMPLETE}
#: What a failed load or save may raise (torch's CheckpointException is not an Exception).
IO_ERRORS = (Exception, CheckpointException)
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """A checkpoint marked complete whose files are damaged (truncated, corrupted, missing)."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]):
        self.path, self.problems = Path(path), problems
        self.file = problems[0][0]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        super().__init__(f"checkpoint {path} is damaged: {self.file}: {problems[0][1]}{more}")


def check_complete(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else a ``CheckpointError`` naming it and what is
    missing (a CorruptCheckpointError when the COMPLETE marker is there but a file is not)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist (or is not a folder)")
    if not (p / COMPLETE).exists():
        raise CheckpointError(f"checkpoint {p} is incomplete: missing the COMPLETE marker: a save was interrupted")
    for name, what in (("metadata.json", "dist_checkpointing's metadata"), (".metadata", "the torch_dist metadata"),
                       ("extra.json", "step and config")):
        if not (p / name).exists():
            raise CorruptCheckpointError(p, [(name, f"missing ({what})")])
    return p


def all_gather(obj) -> list:
    """Every rank's ``obj`` (one object all-gather; ``[obj]`` without a process group). Start-up,
    save and load only: never in the training step."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _entry(root: Path, path: Path) -> tuple[str, list[int]]:
    return path.relative_to(root).as_posix(), [path.stat().st_size, crc32(path)]


def own_entries(root: Path, rank: int) -> dict[str, list[int]]:
    """Size and CRC-32 of the files ``rank`` wrote into the checkpoint folder ``root``."""
    mine = [*root.glob(f"__{rank}_*.distcp"), root / "rng" / f"rank_{rank:05d}.pt"]
    return dict(_entry(root, p) for p in mine if p.is_file())


def complete_manifest(root: Path, gathered: list[dict]) -> dict:
    """Rank 0: the gathered entries plus every other file of ``root`` (hashed here)."""
    files: dict[str, list[int]] = {}
    for part in gathered:
        files.update(part)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in files and rel not in _UNLISTED:
            files[rel] = _entry(root, p)[1]
    return {"format": FORMAT, "checksum": "crc32", "files": dict(sorted(files.items()))}


def write(root: Path, manifest: dict) -> None:
    path = root / MANIFEST
    files = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["files"].items())
    with open(path, "w") as f:
        f.write(f'{{"format": {manifest["format"]}, "checksum": "{manifest["checksum"]}", "files": {{\n{files}\n}}}}\n')
        f.flush()
        os.fsync(f.fileno())


def read(root: Path) -> dict | None:
    """The manifest of ``root``; ``None`` for checkpoints written before manifests existed (or by
    tools that write none). Raises ``ValueError`` when it is unreadable (itself damaged)."""
    path = root / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("not a manifest")  # noqa: TRY004 (a damaged file, reported by its name)
    return manifest


def check_share(root: Path, manifest: dict, rank: int, world: int, checksums: bool) -> list[tuple[str, str]]:
    """(file, what is wrong) for this rank's round-robin share of the manifest's files."""
    problems = []
    for i, (rel, (size, crc)) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        p = root / rel
        if not p.is_file():
            problems.append((rel, "missing"))
            continue
        now = p.stat().st_size
        if now != size:
            problems.append((rel, f"{now} bytes, {size} when saved ({'truncated' if now < size else 'grown'})"))
        elif checksums and crc32(p) != crc:
            problems.append((rel, "its CRC-32 differs from the one recorded at save (corrupted)"))
    return problems


def folder_bytes(root: Path) -> int:
    """Total size of the files under ``root`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def describe(e: BaseException) -> tuple[str, int | None]:
    """One line for an I/O failure and its errno, looking into torch's CheckpointException (which
    carries every rank's exception) and the exception chain."""
    seen = [e] + ([exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [])
    for x in list(seen):
        while (x := x.__cause__ or x.__context__) is not None and x not in seen:
            seen.append(x)
    code = next((x.errno for x in seen if isinstance(x, OSError) and x.errno), None)
    leaf = seen[1] if isinstance(e, CheckpointException) and len(seen) > 1 else e
    lines = str(leaf).strip().splitlines()
    return f"{type(leaf).__name__}: {lines[-1] if lines else ''}".rstrip(": "), code


def read_small_files(path: Path, rank: int, world: int, *, scheduler: bool, rng: bool,
                     checksums: bool) -> tuple[dict, list[tuple[str, str]]]:
    """This rank's share of the manifest check, then the small files read (``extra.json``, and
    ``scheduler.pt`` / this rank's ``rng/rank_*.pt`` when asked), so that a damaged one is named
    rather than surfacing as a bare EOFError. Returns ({file: content}, [(file, problem)])."""
    problems: list[tuple[str, str]] = []
    out: dict = {}

    def load(name: str, fn) -> None:
        if not problems:
            try:
                out[name] = fn(path / name)
            except IO_ERRORS as e:
                problems.append((name, f"unreadable ({describe(e)[0]})"))

    load(MANIFEST, lambda p: read(p.parent))
    if out.get(MANIFEST):
        problems += check_share(path, out[MANIFEST], rank, world, checksums)
    load("extra.json", lambda p: json.loads(p.read_text()))
    if not problems and not (isinstance(out["extra.json"], dict) and {"step", "extra"} <= set(out["extra.json"])):
        problems.append(("extra.json", "has no 'step' / 'extra' entry"))
    if scheduler and (path / "scheduler.pt").exists():
        load("scheduler.pt", lambda p: torch.load(p, weights_only=False))
    name = f"rng/rank_{rank:05d}.pt"
    if rng and not problems and out["extra.json"].get("world_size") == world and (path / name).exists():
        load(name, lambda p: torch.load(p, weights_only=False))
    out["rng"] = out.pop(name, None)
    return out, problems


def save_failure(root: Path, tmp: Path, step: int, failures: list[tuple[str, int | None]],
                 previous: Path | None) -> str:
    """Rank 0, after a failed save: remove the half-written ``tmp`` folder and say why it failed
    (no space left, not writable, or the first error) and what is left."""
    partial = folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    need = max(folder_bytes(previous) if previous else 0, partial)
    codes = {c for _, c in failures if c}
    try:
        free = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).free
    except OSError:
        free = None
    if errno.ENOSPC in codes or (free is not None and free < need + (1 << 20)):
        cause = (f"no space left on device ({(free or 0) / 2**20:.1f} MiB free, a checkpoint takes about "
                 f"{need / 2**20:.1f} MiB)")
    elif codes & _NOT_WRITABLE:
        cause = f"the directory is not writable ({os.strerror(min(codes & _NOT_WRITABLE))})"
    else:
        cause = failures[0][0]
    kept = f"the newest complete checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    return (f"could not save checkpoint step {step} in {root}: {cause} [{failures[0][0]}]; the incomplete "
            f"{tmp.name} {'could not be' if tmp.exists() else 'was'} removed and {kept}. Free space or fix the "
            "directory, then relaunch the same command (it resumes from the newest complete checkpoint)")


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint folder to ``step_N.broken`` (``.broken.1``, ... if taken): out of
    the way of ``resume=auto`` and of pruning, kept for inspection."""
    k, target = 0, path.with_name(path.name + ".broken")
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.broken.{k}")
    os.replace(path, target)
    return target


def set_aside_all(root: Path) -> tuple[Path, list[str]] | None:
    """Move every ``step_N`` (and ``step_N.tmp``) folder of ``root`` into ``root/superseded-<time>/``;
    returns (that folder, the names moved), or None when there was nothing to move."""
    old = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"^step_\d{8}(\.tmp)?$", p.name))
    if not old:
        return None
    dest = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    return dest, [p.name for p in old]
