"""``twotower-launch``: a Hydra experiment + a ``cluster/`` preset -> a running, self-requeuing job.

The same ``conf/`` and the same overrides as ``twotower-train``; ``launch.*`` and ``cluster.*`` keys
say how to run it. Examples::

    twotower-launch experiment=smoke_cpu cluster.tasks_per_node=2                # here: torchrun, 2 ranks
    twotower-launch experiment=twotower_nano_2p1t cluster=slurm_h100 launch.dry_run=true
    twotower-launch experiment=twotower_nano_2p1t cluster.account=my_acct        # submit (64 nodes)
    twotower-launch experiment=twotower_nano_2p1t cluster.account=my_acct launch.chain=5
    twotower-launch status run_dir=runs/twotower_nano_2p1t [--json]

Steps: compose -> freeze (``job.build_job``) -> check (``preflight``: cluster preset, layout,
plan, run dir, sbatch) -> render (``script``) -> with ``launch.dry_run=true`` print the script,
the plan and the resolved config and stop; else write ``RUN/launch/<submission>/`` and submit
(``slurm``) or run here (``local``). Job ids are printed and recorded in
``RUN/launch/submissions.jsonl``.

Exit status: 0 submitted (local: the training finished), 1 the scheduler refused (local: the
job's own status), 2 bad input (unknown experiment or cluster, missing account or partition,
layout that does not match the ranks, run dir of another experiment, no sbatch), 3 the plan
does not fit. Nothing is submitted or written when the status is 2 or 3.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twotower.training.quiet import quiet_third_party

quiet_third_party()  # before megatron is imported (through the config schema): its notices fire at import

from twotower.launch import preflight, slurm
from twotower.launch.errors import LaunchError
from twotower.launch.job import JobSpec, build_job
from twotower.launch.rundir import RunDir
from twotower.launch.script import render


def compose(overrides: list[str]):
    """``conf/config.yaml`` + overrides, as ``twotower-train`` composes them -> (config node, experiment)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from twotower.training.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="twotower.conf", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise LaunchError(str(err).split("\nConfig search path")[0].strip()) from err
    finally:
        GlobalHydra.instance().clear()
    experiment = cfg.hydra.runtime.choices.get("experiment")
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, experiment


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] in (["-h"], ["--help"]):
            print(__doc__)
            return 0
        if args[:1] == ["status"]:
            return _status(args[1:])
        return launch(args)
    except LaunchError as err:
        print(f"twotower-launch: {err}", file=sys.stderr)
        return err.code


def launch(overrides: list[str]) -> int:
    node, experiment = compose(overrides)
    spec = build_job(node, experiment=experiment, overrides=overrides)
    table = preflight.check(spec)
    for note in spec.notes:
        print(f"twotower-launch: note: {note}", file=sys.stderr)
    if spec.launch.dry_run:
        _print_dry_run(spec, table)
        return 0
    rd = RunDir(spec.run_dir)
    running = _still_queued(rd)
    spec.submission = rd.new_submission_dir(spec.submission).name
    script = spec.sub_dir / "job.sh"
    script.write_text(render(spec) + "\n")
    script.chmod(0o755)
    (spec.sub_dir / "config.yaml").write_text(spec.train_config_yaml())
    rd.reset_failures()
    record = {"submission": spec.submission, "time": spec.created, "experiment": spec.experiment,
              "overrides": spec.overrides, "cluster": spec.cluster.name, "mode": spec.mode,
              "nodes": spec.cluster.nodes, "world_size": spec.world_size, "script": str(script),
              "git_commit": _git_commit(), "job_ids": []}
    if spec.mode == "local":
        from twotower.launch.local import run_local

        rd.add_submission({**record, "job_ids": ["local"]})
        print(f"[twotower-launch] running {spec.world_size} process(es) here; submission {spec.sub_dir}", flush=True)
        return run_local(spec, script)
    try:
        ids = slurm.submit(spec, script)
    except LaunchError as err:
        rd.add_submission({**record, "job_ids": getattr(err, "job_ids", []), "error": str(err)})
        raise
    rd.add_submission({**record, "job_ids": ids})
    if running:
        print(f"twotower-launch: note: earlier jobs of this run are still queued ({', '.join(running)}); "
              "singleton runs one at a time", file=sys.stderr)
    segs = f" (a chain of {len(ids)} segments: {' -> '.join(ids)})" if len(ids) > 1 else ""
    print(f"Submitted batch job {ids[0]}{segs}\n  script  {script}\n  logs    {spec.sub_dir}/slurm-<job id>.out\n"
          f"  status  twotower-launch status run_dir={spec.run_dir}", flush=True)
    return 0


def _print_dry_run(spec: JobSpec, table: str | None) -> None:
    script = spec.sub_dir / "job.sh"
    print(f"# ---- {script} (dry run: nothing written, nothing submitted) ----")
    print(render(spec))
    if spec.mode == "local":
        print(f"# ---- run with ----\nbash {script}   # segment after segment while it exits 75")
    else:
        print("# ---- submit with ----")
        for k in range(max(spec.launch.chain, 1)):
            print(" ".join(slurm.sbatch_command(script, f"<job id of segment {k}>" if k else None)))
    if table:
        print(f"# ---- plan: {spec.world_size} x {spec.cluster.gpu} ----\n{table}")
    print(f"# ---- {spec.sub_dir / 'config.yaml'} (the resolved config every segment trains) ----")
    print(spec.train_config_yaml())


def _still_queued(rd: RunDir) -> list[str]:
    ids = [j for s in rd.submissions() for j in s.get("job_ids", []) if str(j).isdigit()]
    return [j for j, state in slurm.states(ids).items() if state in ("PENDING", "RUNNING", "REQUEUED")]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _status(args: list[str]) -> int:
    from twotower.launch import status

    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("run_dir=")), None)
    if run_dir is None and len(args) == 1 and "=" not in args[0]:
        run_dir = args[0]
    if run_dir is None:  # the launch's own overrides: experiment=NAME trainer.run_dir=...
        node, experiment = compose(args)
        run_dir = build_job(node, experiment=experiment, overrides=args).run_dir
    if not Path(run_dir).is_dir():
        raise LaunchError(f"status: run directory {run_dir} does not exist")
    report = status.collect(run_dir)
    print(json.dumps(report, indent=2, default=str) if as_json else status.format_status(report))
    return 0
