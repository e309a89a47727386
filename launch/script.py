"""The job script: ``#SBATCH`` resources, the training command, and the segment logic that requeues.

Stage: after the checks. Input: a ``JobSpec``. Output: a bash script (``RUN/launch/<sub>/job.sh``)
in three parts:

1. ``#SBATCH`` lines (SLURM modes only), from ``sbatch_options``: account, partition, QoS, nodes,
   one task per GPU, CPUs and memory, time limit, ``--exclusive``, ``--requeue`` (``--no-requeue``
   for ``launch.chain``), ``--signal=B:USR1@<launch.signal_seconds>``, the job name with
   ``--dependency=singleton``, ``--open-mode=append`` and the log ``<sub>/slurm-%j.out``;
2. the job's variables, the cluster's environment and setup lines, and the training command:
   ``srun`` one task per GPU (``twotower-train`` maps SLURM_PROCID/NTASKS/LOCALID to RANK/
   WORLD_SIZE/LOCAL_RANK) or, for ``cluster=local``, ``torchrun --standalone --nproc_per_node``;
3. ``SEGMENT_LOGIC``: the same text in every job. It sets MASTER_ADDR to the first host of
   ``scontrol show hostnames`` and MASTER_PORT from the job id, runs the training in the
   background, forwards the scheduler's notice (SIGUSR1 to the batch shell) to the training, and
   decides from the exit code and the newest complete checkpoint what comes next:

   ====================  ===========================================================
   exit 0                done: mark the submission DONE, end
   exit 2, 3, 4, 5       fatal (config, plan, non-finite losses, bad input): GAVE_UP
   SIGTERM, no notice    scancel / preemption: end; SLURM requeues preempted jobs itself
   anything else         (6 = stopped with a checkpoint, or a crash) count a failure
                         unless a newer checkpoint exists; at launch.max_failures in a
                         row: GAVE_UP; else requeue (``scontrol requeue``), end the
                         chain segment, or (local) exit 75 so the launcher runs it again
   ====================  ===========================================================

Why ``srun`` with one task per GPU, not one ``torchrun`` per node with a c10d rendezvous:

* exit codes: srun exits with the highest task status, so ``twotower-train``'s 6 (stopped with a
  checkpoint) or 2-5 (fatal) reach this script; torchrun's agent turns any failed worker into 1.
* signals: srun passes SIGUSR1/SIGTERM on to every task, where the trainer's handler stops after
  the step; torchrun's agent does not handle SIGUSR1 by default (``TORCHELASTIC_SIGNALS_TO_HANDLE``:
  TERM, INT, HUP, QUIT), so the notice would kill the agent, and on SIGTERM it ends the workers
  itself on its own timeout.
* one layer less: no agent, no rendezvous store, no elastic restarts inside a job (a restart is a
  requeue that resumes the checkpoint anyway); pyxis' ``--container-image`` applies per task; SLURM
  tracks, accounts and kills every rank itself. ``twotower-train`` already maps SLURM's task
  variables to torch's. Every task sees all GPUs of its node (``--gpus-per-node``, no per-task
  binding) and picks ``LOCAL_RANK``: CUDA IPC / NVLink paths between ranks stay visible to NCCL.
* no ``--kill-on-bad-exit``: SLURM would kill the slower ranks of a clean stop (all exit 6 within
  moments) and their 137 would hide the 6. A crashed rank's peers end through the NCCL watchdog
  (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, the process-group timeout) instead; sites that prefer the
  fast kill add it to ``cluster.srun_args`` (the progress rule below still requeues correctly).

Example::

    text = render(spec)        # bash -n clean; `sbatch job.sh` by hand resubmits it as it was
"""

from __future__ import annotations

import shlex

from twotower.launch.job import JobSpec
from twotower.training.train import ExitCode

#: job.sh's exit status in local mode for "stopped with a checkpoint: run me again" (sysexits EX_TEMPFAIL).
RERUN_EXIT = 75
#: twotower-train's exit codes after which running again would fail the same way.
FATAL_CODES = (ExitCode.CONFIG, ExitCode.PLAN, ExitCode.NONFINITE, ExitCode.BAD_INPUT)


def log_name(spec: JobSpec) -> str:
    return "local.out" if spec.mode == "local" else "slurm-%j.out"


def sbatch_options(spec: JobSpec) -> list[str]:
    """The ``#SBATCH`` options, ``--key=value`` each (what a test or a reviewer checks field by field)."""
    c, L = spec.cluster, spec.launch
    opts = [f"--job-name={spec.job_name}", f"--account={c.account}", f"--partition={c.partition}"]
    if c.qos:
        opts.append(f"--qos={c.qos}")
    opts += [f"--nodes={c.nodes}", f"--ntasks-per-node={spec.procs_per_node}"]
    if c.gpus_per_node:
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.cpus_per_node:
        opts.append(f"--cpus-per-task={c.cpus_per_node // spec.procs_per_node}")
    if c.mem is not None:
        opts.append(f"--mem={c.mem}")
    opts.append(f"--time={c.time}")
    if c.exclusive:
        opts.append("--exclusive")
    opts += ["--no-requeue" if spec.mode == "chain" else "--requeue", f"--signal=B:USR1@{L.signal_seconds}",
             "--dependency=singleton", "--open-mode=append", f"--output={spec.sub_dir}/{log_name(spec)}",
             f"--chdir={spec.workdir}"]
    return opts + list(c.sbatch_args)


def train_command(spec: JobSpec) -> list[str]:
    """The command that starts every rank of one segment."""
    c = spec.cluster
    train = ["-m", "twotower.training.train", f"--config-path={spec.sub_dir}", "--config-name=config"]
    if spec.mode == "local":
        return [spec.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc_per_node={spec.procs_per_node}", *train]
    cmd = ["srun", f"--nodes={c.nodes}", f"--ntasks-per-node={spec.procs_per_node}"]
    if c.cpus_per_node:
        cmd.append(f"--cpus-per-task={c.cpus_per_node // spec.procs_per_node}")
    if c.container_image:
        cmd.append(f"--container-image={c.container_image}")
        if c.container_mounts:
            cmd.append(f"--container-mounts={','.join(c.container_mounts)}")
        cmd.append(f"--container-workdir={spec.workdir}")
    return cmd + list(c.srun_args) + [spec.python, *train]


def render(spec: JobSpec) -> str:
    c, q = spec.cluster, shlex.quote
    out = ["#!/bin/bash"]
    if spec.mode != "local":
        out += [f"#SBATCH {opt}" for opt in sbatch_options(spec)]
    out += [
        (f"# twotower-launch, submission {spec.submission} ({spec.created}): experiment={spec.experiment} "
        f"cluster={c.name} mode={spec.mode}"),
        f"# overrides: {' '.join(spec.overrides) or '(none)'}",
        "# The training reads the resolved config next to this file; resubmit this segment by hand with",
        f"#   {'bash' if spec.mode == 'local' else 'sbatch'} {spec.sub_dir}/job.sh",
        "set -uo pipefail  # no -e: the segment logic below reads every exit code itself",
        "",
        f"RUN_DIR={q(str(spec.run_dir))}",
        f"CKPT_DIR={q(str(spec.ckpt_dir))}",
        f"SUB_DIR={q(str(spec.sub_dir))}",
        'STATE_DIR="$RUN_DIR/launch"',
        f"SUBMISSION={q(spec.submission)}",
        f"MODE={spec.mode}                 # local | requeue | chain",
        f"MAX_FAILURES={spec.launch.max_failures}           # launch.max_failures",
        (f"FATAL_CODES={q(' '.join(str(int(x)) for x in FATAL_CODES))}  # twotower-train: config, plan, "
        "non-finite, bad input"),
        f"RERUN_EXIT={RERUN_EXIT}",
        # srun passes SIGUSR1 on to every task; torchrun's agent would die of it, so it gets SIGTERM
        f"FORWARD_USR1={'TERM' if spec.mode == 'local' else 'USR1'}",
        f"cd {q(str(spec.workdir))} || exit 1",
        "",
        "export PYTHONUNBUFFERED=1",
    ]
    out += [f"export {k}={q(str(v))}" for k, v in c.env.items()]
    out += list(c.setup)
    out += ["", "TRAIN=(" + " ".join(q(a) for a in train_command(spec)) + ")", "", SEGMENT_LOGIC]
    return "\n".join(out)


SEGMENT_LOGIC = r"""# ---------------------------------------------------------------- segment logic (the same in every job)
log() { printf '[twotower-launch %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
ckpt() { if (( $1 < 0 )); then echo "none"; else echo "step $1"; fi; }

latest_step() {  # step of the newest complete checkpoint (a COMPLETE marker) under $CKPT_DIR; -1: none
    local best=-1 marker step
    for marker in "$CKPT_DIR"/step_*/COMPLETE; do
        [[ -e $marker ]] || continue
        step=${marker%/COMPLETE}
        step=${step##*/step_}
        [[ $step =~ ^[0-9]+$ ]] && (( 10#$step > best )) && best=$((10#$step))
    done
    echo "$best"
}

record() {  # one JSON line per finished segment, read by `twotower-launch status`
    printf '{"time": "%s", "submission": "%s", "job_id": "%s", "restart": %d, "rc": %d, "step_before": %d, "step_after": %d, "failures": %d, "decision": "%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SUBMISSION" "$JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$rc" \
        "$before" "$after" "$failures" "$1" >> "$STATE_DIR/segments.jsonl"
}

JOB_ID=${SLURM_JOB_ID:-local-$$}
mkdir -p "$STATE_DIR"
if [[ -e $SUB_DIR/DONE ]]; then
    log "this submission's training already finished ($SUB_DIR/DONE): nothing to do"
    exit 0
fi
if [[ -e $SUB_DIR/GAVE_UP ]]; then
    log "this submission gave up: $(<"$SUB_DIR/GAVE_UP")"
    exit 1
fi

if [[ $MODE != local ]]; then  # rank 0 runs on the allocation's first host, as SLURM itself expands the list
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${hosts%%$'\n'*}
    if [[ -z $MASTER_ADDR ]]; then
        log "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
        exit 1
    fi
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))  # below the ephemeral ports; one job per node set
    export MASTER_ADDR MASTER_PORT
fi

before=$(latest_step)
after=$before
rc=0
failures=$(cat "$STATE_DIR/failures" 2>/dev/null || echo 0)
[[ $failures =~ ^[0-9]+$ ]] || failures=0
log "job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s)," \
    "rendezvous ${MASTER_ADDR:-localhost}:${MASTER_PORT:-auto}, newest checkpoint: $(ckpt "$before")"

child=
notified=0
terminated=0
forward() {  # $1: the signal this shell got; $2: the signal the training gets
    if [[ $1 == USR1 ]]; then notified=1; elif (( ! notified )); then terminated=1; fi
    log "got SIG$1: sending SIG$2 to the training (it stops after the current step with a checkpoint)"
    [[ -n $child ]] && kill -s "$2" "$child" 2>/dev/null
}
trap 'forward USR1 "$FORWARD_USR1"' USR1
trap 'forward TERM TERM' TERM
trap 'forward INT TERM' INT  # Ctrl-C on a local run: stop with a checkpoint, no rerun
"${TRAIN[@]}" &
child=$!
while kill -0 "$child" 2>/dev/null; do wait "$child"; done  # a trap makes `wait` return early
wait "$child"
rc=$?
trap - USR1 TERM INT
after=$(latest_step)
log "training exited with code $rc; newest checkpoint: $(ckpt "$after")"

if (( rc == 0 )); then
    failures=0
    echo 0 > "$STATE_DIR/failures"
    date -u +%Y-%m-%dT%H:%M:%SZ > "$SUB_DIR/DONE"
    record done
    log "training finished"
    exit 0
fi
if [[ " $FATAL_CODES " == *" $rc "* ]]; then
    echo "twotower-train exited with $rc (2 configuration, 3 plan, 4 non-finite losses, 5 bad checkpoint," \
        "backbone or shard): running it again would fail the same way" > "$SUB_DIR/GAVE_UP"
    record fatal
    log "$(<"$SUB_DIR/GAVE_UP")"
    exit "$rc"
fi
if (( terminated )); then  # SIGTERM without the time-limit notice: scancel, preemption, node shutdown
    record terminated
    log "terminated: not requeued (SLURM requeues a preempted --requeue job itself)"
    exit "$rc"
fi
if (( after > before )); then failures=0; else failures=$((failures + 1)); fi
echo "$failures" > "$STATE_DIR/failures"
if (( failures >= MAX_FAILURES )); then
    echo "$failures segments in a row ended without a new checkpoint (last exit code $rc;" \
        "launch.max_failures=$MAX_FAILURES)" > "$SUB_DIR/GAVE_UP"
    record gave_up
    log "giving up: $(<"$SUB_DIR/GAVE_UP")"
    exit 1
fi
case $MODE in
    requeue)
        record requeue
        log "exit code $rc, newest checkpoint $(ckpt "$after"): requeueing job $SLURM_JOB_ID"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            log "scontrol requeue $SLURM_JOB_ID failed: resubmit with sbatch $SUB_DIR/job.sh"
            exit 1
        fi
        exit 0 ;;
    chain)
        record next_segment
        log "exit code $rc, newest checkpoint $(ckpt "$after"): the next segment of the chain continues"
        exit 0 ;;
    *)
        record rerun
        exit "$RERUN_EXIT" ;;
esac
"""
