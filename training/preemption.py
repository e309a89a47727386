"""Graceful stops: a preemption signal or a planned exit step ends the run with a checkpoint.

Stage: checked by the training loop after every optimizer step. SLURM (``#SBATCH
--signal=B:USR1@180`` or ``scancel --signal=TERM``), Kubernetes and most schedulers send a
signal some time before they kill a job; the handler only sets a flag, the loop finishes
the current step, writes a checkpoint and returns, and the next launch resumes with
``checkpoint.resume=auto``. The flag is all-reduced (MAX) over all ranks every step, so all
ranks stop at the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import signal

import torch

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
