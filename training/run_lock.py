"""One training process per run: an OS file lock on the run directory and on the checkpoint directory.

Stage: Trainer start-up, before anything there is read or written. Global rank 0 holds the locks
for the life of the Trainer (released by ``Trainer.close``, or by the kernel when the process dies);
every rank learns the outcome, so all refuse together.

``{run_dir}/.twotower.lock`` and ``{checkpoint.dir}/../.{name}.twotower.lock`` (beside the
checkpoint folder, whose listing stays checkpoints only) are locked with ``fcntl.flock`` (exclusive,
non-blocking) and hold their holder's host, pid, start time and SLURM job. A second process on the same run directory or
checkpoint directory is refused with :class:`RunLockedError` naming that holder, instead of both
running and interleaving ``metrics.jsonl`` or mixing checkpoints. A lock file left by a dead
process does not block: the lock belongs to the open file, not to the file on disk. Where the
filesystem offers no ``flock`` (e.g. Lustre mounted without ``-o flock``) a warning is printed and
the run goes on unlocked. Each directory is also probed for writability (a file created, synced and
removed), so that a read-only checkpoint directory is reported before training, not at the first save.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from twotower.training.checkpoint import CheckpointError
from twotower.training.checkpoint_integrity import all_gather

LOCK_NAME = ".twotower.lock"


class RunLockedError(CheckpointError):
    """Another live process holds the run directory or the checkpoint directory."""


def probe_writable(d: Path) -> None:
    """Create, sync and remove a file in ``d`` (created with its parents if missing): OSError if not writable."""
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    with open(probe, "w") as f:
        f.write("probe\n")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
        return f"host {h['host']}, pid {h['pid']}, since {h['since']}{job}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown (it may be starting)" if not text else f"holder {text[:200]!r}"


def lock_file(d: str | Path, inside: bool) -> Path:
    """The lock file of directory ``d``: in it, or beside it (``.{name}.twotower.lock``)."""
    d = Path(d).resolve()
    return d / LOCK_NAME if inside else d.parent / f".{d.name}{LOCK_NAME}"


class RunLock:
    def __init__(self, run_dir: str | Path, checkpoint_dir: str | Path):
        self.dirs = [Path(run_dir).resolve()]
        if Path(checkpoint_dir).resolve() != self.dirs[0]:  # the same folder is locked once
            self.dirs.append(Path(checkpoint_dir).resolve())
        self._files: list = []

    def acquire(self) -> None:
        try:
            for i, d in enumerate(self.dirs):
                self._acquire(d, lock_file(d, inside=i == 0))
        except BaseException:
            self.release()
            raise

    def _acquire(self, d: Path, path: Path) -> None:
        try:
            probe_writable(d)
            f = open(path, "a+")  # noqa: SIM115 (held open for the life of the run)
        except OSError as e:
            raise CheckpointError(f"{d} is not writable ({e.strerror or e}): training would fail at the first "
                                  "checkpoint or log line; fix it or point trainer.run_dir / checkpoint.dir "
                                  "elsewhere") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder(f.read().strip())
            f.close()
            raise RunLockedError(f"{d} is in use by another training process ({holder}; lock file "
                                 f"{path}): wait for it to end or stop it, or choose another "
                                 "trainer.run_dir / checkpoint.dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP...: no flock on this filesystem
            f.close()
            print(f"[twotower] warning: cannot lock {d} ({e.strerror or e}); make sure no other training "
                  "process uses it", file=sys.stderr, flush=True)
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "slurm_job": os.environ.get("SLURM_JOB_ID")}) + "\n")
        f.flush()
        self._files.append(f)

    def release(self) -> None:
        for f in self._files:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()
        self._files.clear()


def lock_run(run_dir: str | Path, checkpoint_dir: str | Path, rank: int) -> RunLock | None:
    """Collective: rank 0 probes and locks both directories; every rank returns (rank 0: the lock) or
    raises the same error (RunLockedError: another process holds one; CheckpointError: not writable)."""
    lock = err = None
    if rank == 0:
        lock = RunLock(run_dir, checkpoint_dir)
        try:
            lock.acquire()
        except CheckpointError as e:
            err = (isinstance(e, RunLockedError), str(e))
    err = all_gather(err)[0]
    if err:
        raise (RunLockedError if err[0] else CheckpointError)(err[1])
    return lock
