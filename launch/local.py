"""``cluster=local``: run the job script on this machine, segment after segment, as SLURM would requeue it.

Stage: the last step of ``twotower-launch`` with ``cluster.scheduler=local``. Input: the rendered
script (the same segment logic as on SLURM, with ``torchrun --standalone --nproc_per_node`` in place
of ``srun``). Output: the final exit status. The script exits ``RERUN_EXIT`` (75) where a SLURM job
would call ``scontrol requeue`` (stopped with a checkpoint, or a crash under the failure cap); this
loop then runs it again. Its output goes to the console and to ``<sub>/local.out``.

Signals: SIGTERM to this process, or Ctrl-C, stops the training with a checkpoint and ends the
loop (like ``scancel``); SIGUSR1 stops it with a checkpoint and runs the next segment (like the time-limit
notice). torchrun's agent reports any failing worker as exit 1, so locally the decision rests on
the newest checkpoint rather than on ``twotower-train``'s exit code (see ``script.py``).

Example::

    rc = run_local(spec, spec.sub_dir / "job.sh")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from twotower.launch.job import JobSpec
from twotower.launch.script import RERUN_EXIT


def run_local(spec: JobSpec, script: Path, *, stream=None) -> int:
    stream = stream or sys.stdout
    segment = 0
    while True:
        segment += 1
        rc = _run_segment(script, spec.workdir, spec.sub_dir / "local.out", stream)
        if rc != RERUN_EXIT:
            return rc
        print(f"[twotower-launch] segment {segment} stopped with a checkpoint: starting segment {segment + 1}",
              file=stream, flush=True)


def _run_segment(script: Path, cwd: Path, log: Path, stream) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(["bash", str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # pass the notice on to the script's trap
        try:
            previous[sig] = signal.signal(sig, lambda s, _f: proc.send_signal(s))
        except ValueError:  # not the main thread: no forwarding
            pass
    try:
        with log.open("a") as f:
            while True:
                try:
                    for line in proc.stdout:
                        stream.write(line)
                        stream.flush()
                        f.write(line)
                        f.flush()
                    break
                except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the script's trap
                    continue               # stops the training with a checkpoint; keep its output flowing
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
