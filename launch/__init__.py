"""Jobs: ``twotower-launch`` turns a Hydra experiment plus a ``cluster/`` preset into a running job.

One concept per module, in the order a launch runs them::

    cli.py        the command: compose conf/ with the overrides, check, render, dry-run or submit; `status`
    job.py        JobSpec: the config frozen at submission (resolved, absolute run/checkpoint dirs) + names
    preflight.py  refusals before anything is written: cluster preset, layout vs ranks, plan, run dir, sbatch
    script.py     the job script: #SBATCH lines, srun (or local torchrun), the requeue/failure-cap logic
    slurm.py      sbatch (one self-requeuing job, or a chain of afterany segments), squeue/sacct states
    local.py      cluster=local: run the same script here, segment after segment
    rundir.py     RUN/launch/: submissions, segment records, failure counter, whose run it is
    status.py     `twotower-launch status`: checkpoint, progress, last metrics, ETA, job states
    errors.py     LaunchError and the launcher's exit status

Examples::

    twotower-launch experiment=smoke_cpu cluster.tasks_per_node=2
    twotower-launch experiment=twotower_nano_2p1t cluster.account=my_acct launch.dry_run=true
    twotower-launch status run_dir=runs/twotower_nano_2p1t

``launch`` holds no maths: sizes come from ``training/planner.py``, validation from
``training/config.py``, exit codes from ``training/train.py``.
"""
