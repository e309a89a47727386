"""The run directory's launch records: what was submitted, what each segment did, whose run it is.

Layout under ``trainer.run_dir`` (the trainer owns ``config.yaml``, ``metrics.jsonl`` and the
checkpoints; the launcher and its job scripts own ``launch/``)::

    RUN/launch/
        submissions.jsonl     one line per twotower-launch: time, experiment, overrides, cluster,
                              mode, job ids, script (written by the launcher)
        segments.jsonl        one line per finished segment: job id, restart, exit code, newest
                              checkpoint step before and after, decision (written by job.sh)
        failures              segments in a row that ended without a new checkpoint (job.sh; reset
                              by progress, by success and by a new submission)
        <submission>/         e.g. 20250101-120000/
            job.sh            the sbatch script (cluster=local: the same script, run by bash)
            config.yaml       the resolved config every segment trains
            slurm-<jobid>.out the job's log, appended across requeues (local runs: local.out)
            DONE | GAVE_UP    written by job.sh; later segments of this submission exit at once

Example::

    rd = RunDir("runs/smoke_cpu")
    rd.check_owner(experiment="smoke_cpu", resolved=spec.resolved)   # LaunchError if not ours
    rd.latest_checkpoint_step(spec.ckpt_dir)                          # -1: none yet
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from twotower.launch.errors import LaunchError

STEP_DIR = re.compile(r"^step_(\d+)$")  # training/checkpoint.py: step_{N:08d}/ with a COMPLETE marker
COMPLETE = "COMPLETE"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.launch = self.path / "launch"

    # ------------------------------------------------------------------ records
    @staticmethod
    def _jsonl(path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it, keep the rest
                continue
        return rows

    def submissions(self) -> list[dict]:
        return self._jsonl(self.launch / "submissions.jsonl")

    def segments(self) -> list[dict]:
        return self._jsonl(self.launch / "segments.jsonl")

    def add_submission(self, record: dict) -> None:
        self.launch.mkdir(parents=True, exist_ok=True)
        with (self.launch / "submissions.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def failures(self) -> int:
        try:
            return int((self.launch / "failures").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def reset_failures(self) -> None:
        self.launch.mkdir(parents=True, exist_ok=True)
        (self.launch / "failures").write_text("0\n")

    def new_submission_dir(self, submission: str) -> Path:
        """``launch/<submission>/`` (``-2``, ``-3``... when two launches share a second)."""
        name, k = submission, 1
        while (self.launch / name).exists():
            k += 1
            name = f"{submission}-{k}"
        (self.launch / name).mkdir(parents=True)
        return self.launch / name

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def latest_checkpoint(ckpt_dir: str | Path) -> tuple[int, Path | None]:
        """(step, folder) of the newest complete checkpoint; (-1, None) when there is none. The
        same rule as ``Checkpointer.latest`` and job.sh's ``latest_step``: a COMPLETE marker."""
        best: tuple[int, Path | None] = (-1, None)
        root = Path(ckpt_dir)
        if root.is_dir():
            for p in root.iterdir():
                m = STEP_DIR.match(p.name)
                if m and (p / COMPLETE).exists() and int(m[1]) > best[0]:
                    best = (int(m[1]), p)
        return best

    # ------------------------------------------------------------------ ownership
    def check_owner(self, *, experiment: str | None, resolved: dict[str, Any]) -> None:
        """Refuse a run directory that holds another experiment's run (launch records) or another
        model / objective (the trainer's ``config.yaml``): its checkpoints would be resumed."""
        subs = self.submissions()
        if subs and subs[-1].get("experiment") != experiment:
            raise LaunchError(
                f"run directory {self.path} belongs to experiment={subs[-1].get('experiment')} (see "
                f"{self.launch / 'submissions.jsonl'}); this launch is experiment={experiment}: choose another "
                "trainer.run_dir")
        trained = self.path / "config.yaml"
        if not trained.exists():
            return
        try:
            saved = yaml.safe_load(trained.read_text()) or {}
        except yaml.YAMLError:
            return
        diffs = [f"model.{k}: {v!r} there, {resolved['model'].get(k)!r} here"
                 for k, v in (saved.get("model") or {}).items() if resolved["model"].get(k) != v]
        if saved.get("objective", resolved["objective"]) != resolved["objective"]:
            diffs.append(f"objective: {saved['objective']!r} there, {resolved['objective']!r} here")
        if diffs:
            raise LaunchError(f"run directory {self.path} holds a run of another model ({trained}): "
                              + "; ".join(diffs[:4]) + ". Choose another trainer.run_dir")
