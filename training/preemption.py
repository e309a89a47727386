"""Graceful stops: a preemption signal or a planned exit step ends the run with a checkpoint.

Stage: checked by the training loop after every optimizer step. SLURM (``#SBATCH
--signal=B:USR1@180`` or ``scancel --signal=TERM``), Kubernetes and most schedulers send a
signal some time before they kill a job; the handler only sets a flag, the loop finishes
the current step, writes a checkpoint and returns, and the next launch resumes with
``checkpoint.resume=auto``. The flag is all-reduced (MAX) over all ranks every step, so all
ranks stop at the same step even when the signal reached only some of them.

Helper processes. ``scancel`` and a SLURM time limit signal the whole process group, helpers
included; :func:`install_child_policy` (called by ``twotower-train``) makes every helper the
trainer forks from its main thread die with it (``PR_SET_PDEATHSIG``: a SIGKILLed trainer leaves
no orphans) and starts megatron's checkpoint-writer result queue in a helper that drops SIGTERM /
SIGUSR1 unless the trainer sent them, so the checkpoint after a preemption signal can still be
written. The DataLoader workers follow the same policy on their own (data/workers.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import warnings

import torch

from twotower.data.workers import die_with_parent, helper_process_init, stop_signals_blocked

#: Signals that request a graceful stop (SIGINT stays the usual KeyboardInterrupt).
SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    def __init__(self, device: torch.device | str = "cpu", install: bool = True):
        self.device = device
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if install:
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    try:
                        self._previous[sig] = signal.signal(sig, self._handle)
                    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                        pass

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, local_reason: bool = False) -> bool:
        """Collective when torch.distributed is initialised: True on every rank if any rank got a
        signal or passed ``local_reason`` (e.g. its clock says the time budget is spent)."""
        flag = torch.tensor([1.0 if self.signal_name or local_reason else 0.0], device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_FORK = {"arm": False, "parent": 0}
_INSTALLED: list[bool] = []
_MANAGERS: list = []  # keeps the result-queue manager alive as long as this process


def _before_fork() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits: only the main thread lives as long as
    # the trainer, so a child forked elsewhere keeps the default (it is that thread's business).
    # subprocess runs these hooks too when given a preexec_fn: a program it starts is not a helper.
    caller, depth = sys._getframe(1), 0
    while caller is not None and depth < 4 and not caller.f_code.co_filename.endswith("subprocess.py"):
        caller, depth = caller.f_back, depth + 1
    from_subprocess = caller is not None and depth < 4
    _FORK["arm"] = threading.current_thread() is threading.main_thread() and not from_subprocess
    _FORK["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if _FORK["arm"]:
        die_with_parent(_FORK["parent"])


def install_child_policy() -> None:
    """In the trainer process: children forked from now on die with it; megatron's torch_dist
    writer gets a result queue whose server process dies with the trainer and ignores the stop
    signals of others (megatron's own ``spawn`` manager would outlive a SIGKILLed trainer, and die
    on the group's SIGTERM before the final checkpoint is written). Idempotent."""
    if _INSTALLED or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _INSTALLED.append(True)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if not (hasattr(fa, "_get_write_results_queue") and hasattr(fa, "_results_queue")):
        warnings.warn("megatron.core.dist_checkpointing.strategies.filesystem_async has no "
                      "_get_write_results_queue/_results_queue any more: its writer's helper process may "
                      "outlive a killed trainer", stacklevel=2)
        return

    def results_queue():
        if fa._results_queue is None:
            from multiprocessing import resource_tracker
            from multiprocessing.managers import SyncManager

            # spawn, as megatron does (no inherited file descriptors, nothing of CUDA), plus a
            # start-up that shields the server from the stop signals and ties it to this process;
            # the signals stay blocked from before the spawn until its shield thread takes them.
            # The resource tracker first: starting it unblocks SIGTERM in this thread.
            resource_tracker.ensure_running()
            manager = SyncManager(ctx=mp.get_context("spawn"))
            with stop_signals_blocked():
                manager.start(initializer=helper_process_init, initargs=(os.getpid(),))
            _MANAGERS.append(manager)
            fa._results_queue = manager.Queue()
        return fa._results_queue

    fa._get_write_results_queue = results_queue
