"""Checks before anything is written or submitted: the cluster preset, the layout, the plan, the run dir.

Stage: between ``build_job`` and the script. Input: a ``JobSpec``. Output: the planner's table
(GPU clusters) or ``None``; warnings go to ``spec.notes``. Any problem raises ``LaunchError``
naming the key to change:

* a SLURM preset without ``cluster.account`` or ``cluster.partition``; a time limit shorter than
  ``launch.signal_seconds``; a run directory SLURM cannot write (whitespace in the path);
* ``checkpoint.resume`` other than ``auto`` (every segment must resume the run's newest checkpoint);
* ``cluster.nodes x processes per node`` that is not a valid world size for ``parallel.tp/pp/ep``
  and the batch (``TrainConfig.validate``: TP x PP x DP = world, EP | DP x TP, global batch
  divisible by micro-batch x DP);
* a plan that does not fit the GPU memory (``training/planner.py``; exit 3);
* a run directory that holds another experiment or model;
* ``sbatch`` missing from PATH (unless ``launch.dry_run``).

Example::

    table = preflight.check(spec)   # raises LaunchError; returns the plan table on GPU clusters
"""

from __future__ import annotations

import shutil

from twotower.launch.errors import LaunchError
from twotower.launch.job import JobSpec, time_limit_seconds
from twotower.launch.rundir import RunDir
from twotower.model.config import ConfigError


def check(spec: JobSpec) -> str | None:
    _check_cluster(spec)
    _check_resume(spec)
    _check_layout(spec)
    table = _check_plan(spec)
    RunDir(spec.run_dir).check_owner(experiment=spec.experiment, resolved=spec.resolved)
    if spec.mode != "local" and not spec.launch.dry_run and shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: submit from a SLURM login node, print the script with "
                          "launch.dry_run=true, or run here with cluster=local")
    for key, path in (("backbone", spec.cfg.backbone), ("checkpoint.init_from", spec.cfg.checkpoint.init_from)):
        if path and not (spec.workdir / path).exists():  # may be visible on the compute nodes only: a note
            spec.notes.append(f"{key}={path} does not exist on this machine")
    if not spec.cfg.checkpoint.interval:
        spec.notes.append("checkpoint.interval=0: only a stop (signal, time limit) writes a checkpoint; "
                          "a crash restarts the run from its last stop")
    return table


def _check_cluster(spec: JobSpec) -> None:
    c = spec.cluster
    if c.scheduler != "slurm":
        return
    for key in ("account", "partition"):
        if not getattr(c, key):
            raise LaunchError(f"cluster.{key} is not set for the SLURM preset cluster={c.name}: pass cluster.{key}=NAME "
                              f"or set it in conf/cluster/{c.name}.yaml")
    limit = time_limit_seconds(c.time)
    if spec.launch.signal_seconds >= limit:
        raise LaunchError(f"launch.signal_seconds={spec.launch.signal_seconds} is not shorter than cluster.time="
                          f"{c.time} ({limit} s): the stop notice would come before the job starts")
    if c.cpus_per_node and c.cpus_per_node < spec.procs_per_node:
        raise LaunchError(f"cluster.cpus_per_node={c.cpus_per_node} gives fewer than one CPU to each of the "
                          f"{spec.procs_per_node} processes per node")
    if any(ch.isspace() for ch in str(spec.run_dir)):
        raise LaunchError(f"trainer.run_dir={spec.run_dir} contains whitespace, which #SBATCH lines cannot quote")
    if c.container_image:
        dests = [m.split(":")[1] if ":" in m else m for m in c.container_mounts]
        if not any(str(spec.run_dir).startswith(d.rstrip("/") + "/") or str(spec.run_dir) == d for d in dests):
            spec.notes.append(f"trainer.run_dir={spec.run_dir} is under none of cluster.container_mounts: "
                              "the training inside the container may not see it")


def _check_resume(spec: JobSpec) -> None:
    resume = spec.cfg.checkpoint.resume
    if resume != "auto":
        raise LaunchError(
            f"checkpoint.resume={resume}: launched jobs run with checkpoint.resume=auto, so that every segment "
            "resumes the run's newest checkpoint. To start from another run's weights use "
            "checkpoint.init_from=PATH; to start afresh choose a new trainer.run_dir")


def _check_layout(spec: JobSpec) -> None:
    c, p = spec.cluster, spec.cfg.parallel
    try:
        spec.cfg.validate(spec.world_size, check_host=False)  # the backends are checked on the nodes
    except ConfigError as err:
        raise LaunchError(
            f"cluster.nodes={c.nodes} x {spec.procs_per_node} processes per node = {spec.world_size} ranks do not "
            f"fit this run (parallel.tp={p.tp} pp={p.pp} ep={p.ep}, data parallel = ranks / (tp x pp)): {err}"
        ) from err


def _check_plan(spec: JobSpec) -> str | None:
    c, t, cfg = spec.cluster, spec.cfg.trainer, spec.cfg
    if not (spec.launch.plan and c.gpus_per_node):
        return None
    from twotower.training.planner import PlanError, plan

    try:
        report = plan(cfg.model, cfg.parallel, num_gpus=spec.world_size, gpu=c.gpu, gpu_mem_gib=c.gpu_mem_gib,
                      seq_len=t.seq_len, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                      block_size=cfg.twotower.block_size,
                      token_budget=t.tokens_budget or t.max_steps * t.global_batch_size * t.seq_len,
                      distributed_optimizer=cfg.optim.distributed_optimizer, recompute=cfg.twotower.recompute,
                      mfu=c.mfu or None, mfu_source=f"cluster.mfu ({c.name})" if c.mfu else None,
                      time_per_block=cfg.diffusion.time_per == "block")
    except PlanError as err:
        raise LaunchError(f"the plan does not fit (launch.plan=false skips this check): {err}",
                          code=LaunchError.PLAN) from err
    except ValueError as err:  # e.g. a GPU model the planner has no datasheet for
        raise LaunchError(f"planner: {err} (set cluster.gpu, or launch.plan=false)") from err
    return report.table()
