"""Helper processes of a training rank: they ignore the scheduler's stop signals and die with it.

Stage: process start-up (DataLoader workers here; the trainer's other helpers through
``twotower.training.preemption.install_child_policy``).

Why. ``scancel``, a SLURM time limit and most schedulers signal the whole process group (or job
step): the trainer and every helper it forked. The trainer treats SIGTERM / SIGUSR1 as "finish the
step, save, exit 6" (training/preemption.py), but a helper with the default action dies at once,
and the trainer then fails on a dead worker (exit 1, no checkpoint). So helpers ignore both
signals unless their parent sent them: the parent's own ``terminate()`` (DataLoader shutdown,
multiprocessing's exit handler, which then joins without a timeout) must still end them. The
sender is known from ``sigwaitinfo``: the signals stay blocked and one thread waits for them,
exits the process when the parent sent SIGTERM (what torch's worker handler does) and drops
anything else. Conversely, when the trainer is SIGKILLed (OOM killer,
the scheduler's final kill) nothing would stop its helpers: they would live on as orphans holding
memory, files and GPU contexts. ``PR_SET_PDEATHSIG`` (Linux) makes the kernel SIGKILL them when
the trainer dies. It is tied to the *thread* that forked the helper, so helpers must be forked by
a long-lived thread (the trainer's main thread: where DataLoader iterators are created).

Races closed: a signal that arrives between fork and the worker's init function would still hit
the default action; :func:`stop_signals_blocked` blocks the signals in the forking thread while
workers start (the child inherits the mask and keeps it; the parent gets its pending signal when
the block ends). A parent that dies before ``prctl`` runs is caught by
comparing ``os.getppid()`` with the pid recorded before the fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

#: What schedulers send before they kill a job (the trainer stops gracefully on either).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))
_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """libc's prctl, looked up once here (not in a freshly forked child, where a library search
    would have to run a subprocess)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def shield_from_stop_signals(parent_pid: int) -> None:
    """SIGTERM / SIGUSR1 from anyone but ``parent_pid`` are dropped; SIGTERM from the parent ends
    this process with status 0. Without ``sigwaitinfo`` (not Linux): both are ignored."""
    if not hasattr(signal, "sigwaitinfo"):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask
    threading.Thread(target=_wait_for_stop_signals, args=(parent_pid,), name="stop-signal-shield",
                     daemon=True).start()


def _wait_for_stop_signals(parent_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent_pid:
            os._exit(0)


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    ``parent_pid``: the parent as recorded before the fork; if it is already gone, exit now.
    Returns whether the death signal is set."""
    armed = _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the death signal was armed
    return armed


def helper_process_init(parent_pid: int) -> None:
    """Start-up of a helper process: shielded from the scheduler's stop signals, dies with ``parent_pid``."""
    shield_from_stop_signals(parent_pid)
    die_with_parent(parent_pid)


class WorkerInit:
    """``worker_init_fn`` of the token loader's DataLoader workers (picklable)."""

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int) -> None:
        helper_process_init(self.parent_pid)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM / SIGUSR1 in this thread while helpers are forked (see the module doc).

    A signal that arrives meanwhile is delivered when the block ends, not lost."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
