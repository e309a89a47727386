"""A job: the composed Hydra config of one run, frozen, plus everything derived from it for launching.

Stage: after composition, before the checks (``preflight``) and the script (``script``). Input: the
composed config (``conf/config.yaml`` + ``experiment=`` + overrides, Hydra's node without its
``hydra`` section), the experiment's name and the command-line overrides. Output: a ``JobSpec``:

* ``resolved``: the config with every interpolation and ``${oc.env:...}`` resolved *now*, on the
  submitting machine, ``trainer.run_dir`` and ``checkpoint.dir`` made absolute. Every segment of
  the job trains exactly this (``twotower-train --config-path SUB_DIR --config-name config``): a
  requeue days later does not pick up an edited YAML file or another shell's environment.
* paths: the run directory, the checkpoint directory, this submission's folder
  ``RUN/launch/<submission>/`` (script, config, logs), the working directory (relative data paths
  resolve against it);
* the SLURM job name (``--dependency=singleton`` keys on it: one running segment per run dir),
  the mode (``local``, ``requeue`` or ``chain``), processes per node and the interpreter.

Example::

    spec = build_job(node, experiment="smoke_cpu", overrides=["cluster.tasks_per_node=2"])
    spec.world_size, spec.mode, spec.sub_dir      # 2, 'local', /abs/runs/smoke_cpu/launch/2025...
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from twotower.launch.errors import LaunchError
from twotower.model.config import ConfigError
from twotower.training.config import ClusterConfig, LaunchConfig, TrainConfig, to_train_config

_TIME = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})")


def time_limit_seconds(limit: str) -> int:
    """SLURM ``--time`` -> seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    >>> time_limit_seconds("04:00:00"), time_limit_seconds("1-00:30"), time_limit_seconds("90")
    (14400, 88200, 5400)
    """
    m = _TIME.fullmatch(str(limit).strip())
    if not m:
        raise LaunchError(f"cluster.time={limit!r}: use SLURM's format, e.g. 04:00:00, 1-00:00:00 or 90 (minutes)")
    parts = [int(x) for x in m[2].split(":")]
    if m[1] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, sec = (parts + [0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        h, mi, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(m[1] or 0) * 86400 + h * 3600 + mi * 60 + sec


@dataclass
class JobSpec:
    cfg: TrainConfig
    """The validated dataclasses of ``resolved`` (what ``twotower-train`` will build)."""
    resolved: dict[str, Any]
    experiment: str | None
    overrides: list[str]
    run_dir: Path
    ckpt_dir: Path
    workdir: Path
    submission: str
    """This submission's id (UTC time stamp); its files live in ``sub_dir``."""
    created: str
    notes: list[str] = field(default_factory=list)
    """Warnings for the user (printed, not fatal)."""

    @property
    def cluster(self) -> ClusterConfig:
        return self.cfg.cluster

    @property
    def launch(self) -> LaunchConfig:
        return self.cfg.launch

    @property
    def mode(self) -> str:
        """``local`` (torchrun here), ``requeue`` (one self-requeuing job) or ``chain`` (N segments)."""
        if self.cluster.scheduler == "local":
            return "local"
        return "chain" if self.launch.chain else "requeue"

    @property
    def procs_per_node(self) -> int:
        return self.cluster.procs_per_node

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    @property
    def sub_dir(self) -> Path:
        return self.launch_dir / self.submission

    @property
    def job_name(self) -> str:
        if self.launch.job_name:
            return self.launch.job_name
        digest = hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:6]
        return f"tt-{self.run_dir.name}-{digest}"

    @property
    def python(self) -> str:
        """``cluster.python``; else ``python`` where the container or the setup lines choose the
        environment; else this interpreter (a shared filesystem's virtualenv)."""
        c = self.cluster
        if c.python:
            return c.python
        return "python" if (c.container_image or c.setup) else sys.executable

    def train_config_yaml(self) -> str:
        """The Hydra primary config every segment trains (``--config-path sub_dir --config-name config``)."""
        doc = {"defaults": ["config_schema", "_self_"], **self.resolved,
               "hydra": {"run": {"dir": str(self.run_dir)}, "output_subdir": ".hydra", "job": {"chdir": False}}}
        head = (f"# Written by twotower-launch at {self.created} (submission {self.submission}).\n"
                f"# experiment={self.experiment} overrides: {' '.join(self.overrides) or '(none)'}\n"
                "# Every segment of the job trains exactly this config, resolved at submission.\n")
        return head + OmegaConf.to_yaml(doc)


def build_job(node: Any, *, experiment: str | None, overrides: list[str], cwd: Path | None = None,
              now: _dt.datetime | None = None) -> JobSpec:
    """The composed config (without ``hydra``) -> a ``JobSpec``; ConfigError -> ``LaunchError``."""
    cwd = Path(cwd or Path.cwd()).resolve()
    now = now or _dt.datetime.now(_dt.timezone.utc)
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=False))
    run_dir = _absolute(OmegaConf.select(node, "trainer.run_dir"), cwd)
    OmegaConf.update(node, "trainer.run_dir", str(run_dir))  # checkpoint.dir: ${trainer.run_dir}/...
    try:
        resolved = OmegaConf.to_container(node, resolve=True)
    except Exception as err:  # an interpolation (e.g. ${oc.env:...}) that cannot resolve here
        raise LaunchError(f"the config does not resolve: {err}") from err
    ckpt_dir = _absolute(resolved["checkpoint"]["dir"], cwd)
    resolved["checkpoint"]["dir"] = str(ckpt_dir)
    try:
        cfg = to_train_config(resolved)
    except ConfigError as err:
        raise LaunchError(f"configuration error: {err}") from err
    return JobSpec(cfg=cfg, resolved=resolved, experiment=experiment, overrides=list(overrides), run_dir=run_dir,
                   ckpt_dir=ckpt_dir, workdir=cwd, submission=now.strftime("%Y%m%d-%H%M%S"),
                   created=now.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _absolute(path: str, cwd: Path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (cwd / p).resolve()
