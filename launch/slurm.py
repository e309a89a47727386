"""Talking to SLURM: submit a job (or a chain of segments) with ``sbatch``, ask ``squeue``/``sacct``
for job states.

Stage: the last step of ``twotower-launch`` (after the checks, with the script written), and
``twotower-launch status``. Input: the script path and ``launch.chain``. Output: the job ids.

* ``launch.chain=0``: one ``sbatch --parsable job.sh``; the script's ``#SBATCH`` lines carry
  everything (``--requeue``, ``--dependency=singleton``...), so ``sbatch job.sh`` by hand does the same.
* ``launch.chain=N``: N submissions of the same script, segment k with
  ``--dependency=afterany:<id of k-1>,singleton`` (a command-line ``--dependency`` replaces the
  script's, so singleton is repeated). ``afterany``: the next segment starts however the previous
  one ended; the segment logic makes a finished or given-up chain's later segments exit at once.

Example::

    ids = submit(spec, spec.sub_dir / "job.sh")     # ['123456'] or, chained, three ids
    states(ids)                                      # {'123456': 'RUNNING'} when squeue answers
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from twotower.launch.errors import LaunchError
from twotower.launch.job import JobSpec


def sbatch_command(script: Path, after: str | None = None) -> list[str]:
    """The ``sbatch`` argv of one segment; ``after``: the previous segment's id (chains)."""
    cmd = ["sbatch", "--parsable"]
    if after is not None:
        cmd.append(f"--dependency=afterany:{after},singleton")
    return cmd + [str(script)]


def submit(spec: JobSpec, script: Path) -> list[str]:
    """Submit; return the job ids in order. A refused ``sbatch`` raises ``LaunchError`` (code 1) that
    names the ids already submitted (so a half-submitted chain can be cancelled)."""
    ids: list[str] = []
    for k in range(max(spec.launch.chain, 1)):
        cmd = sbatch_command(script, ids[-1] if ids else None)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            why = f"exit {out.returncode}: {(out.stderr or out.stdout).strip()}"
        except (OSError, subprocess.TimeoutExpired) as err:
            out, why = None, str(err)
        job_id = out.stdout.strip().split(";")[0] if out is not None else ""  # --parsable: "<id>[;<cluster>]"
        if out is None or out.returncode != 0 or not job_id.isdigit():
            err = LaunchError(f"sbatch refused segment {k + 1} ({why}); submitted so far: {ids or 'none'}",
                              LaunchError.SUBMIT)
            err.job_ids = list(ids)
            raise err
        ids.append(job_id)
    return ids


def states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state (``PENDING``, ``RUNNING``, ``COMPLETED``...) from ``squeue`` (queued jobs) and
    ``sacct`` (finished ones); ids neither knows, or no SLURM tools here: left out."""
    out: dict[str, str] = {}
    if not job_ids:
        return out
    ids = ",".join(job_ids)
    if shutil.which("squeue"):
        res = _run(["squeue", "--noheader", "--format=%i|%T", f"--jobs={ids}"])
        for line in res.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid in job_ids and state:
                out[jid] = state
    missing = [j for j in job_ids if j not in out]
    if missing and shutil.which("sacct"):
        res = _run(["sacct", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={','.join(missing)}"])
        for line in res.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid in missing and state:  # job steps (123.batch, 123.0) are left out
                out[jid] = state.split()[0]  # "CANCELLED by 1234" -> CANCELLED
    return out


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""
