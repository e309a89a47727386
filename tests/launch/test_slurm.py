"""Submission and the job script's segment logic, against stand-in sbatch/scontrol/srun/squeue on PATH.

Fast tests use an ``srun`` that runs nothing (a crash, a hang until a signal, a fake checkpoint);
the slow one trains for real: a segment stopped by the time-limit notice requeues itself, the next
segment resumes from its checkpoint and the two continue the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fake_slurm import job_id_with_free_port
from launch_helpers import TINY, losses

NANO = ["experiment=twotower_nano_2p1t", "cluster=slurm_h100", "cluster.account=proj_tt", "cluster.partition=gpu"]
#: the tiny run on a "SLURM cluster" of one CPU node with two tasks
SMOKE = [*TINY, "cluster=slurm_h100", "cluster.account=test", "cluster.partition=cpu", "cluster.nodes=1",
         "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_node=0",
         "cluster.env.OMP_NUM_THREADS=1"]


def submitted(launch, run_dir: Path, *overrides: str) -> tuple[Path, list[str], str]:
    rc, out, err = launch(*overrides, f"trainer.run_dir={run_dir}")
    assert rc == 0, err
    sub = json.loads((run_dir / "launch" / "submissions.jsonl").read_text().splitlines()[-1])
    return Path(sub["script"]), sub["job_ids"], out


def segments(run_dir: Path) -> list[dict]:
    path = run_dir / "launch" / "segments.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def run_segment(fake, script: Path, job_id: str, *, restart: int = 0, signals: tuple[str, ...] = (),
                nodelist: str = "localhost", nodes: int = 1, timeout: float = 60, **env: str):
    """Run job.sh as SLURM runs a batch script; send ``signals`` to the batch shell (``B:``) one by one,
    each once the training (srun) is up and has seen the previous one. -> (exit status, output)."""
    proc = subprocess.Popen(["bash", str(script)], env=fake.segment_env(job_id, restart=restart, nodelist=nodelist,
                                                                         nodes=nodes, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    n_srun = len(fake.calls("srun"))
    for k, name in enumerate(signals):
        _wait_for(lambda k=k: len(fake.calls("srun")) > n_srun and len(fake.calls("srun-signal")) >= k, proc)
        proc.send_signal(getattr(signal, f"SIG{name}"))
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _wait_for(condition, proc, timeout: float = 60) -> None:
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"job script ended early: {proc.communicate()[0][-3000:]}"
        assert time.time() - t0 < timeout, "timed out waiting"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ submission
def test_the_right_arguments_reach_sbatch(launch, fake_slurm, tmp_path):
    script, ids, out = submitted(launch, tmp_path / "nano", *NANO)
    (call,) = fake_slurm.calls("sbatch")
    assert call["argv"] == ["--parsable", str(script)]  # everything else is in the script's #SBATCH lines
    eff = call["effective"]
    assert (eff["--account"], eff["--partition"], eff["--nodes"], eff["--ntasks-per-node"], eff["--gpus-per-node"]) == (
        "proj_tt", "gpu", "64", "8", "8")
    assert (eff["--requeue"], eff["--signal"], eff["--dependency"], eff["--open-mode"]) == (
        "", "B:USR1@300", "singleton", "append")
    assert eff["--job-name"].startswith("tt-nano-") and eff["--output"] == f"{script.parent}/slurm-%j.out"
    assert ids == [call["job_id"]] and f"Submitted batch job {ids[0]}" in out
    assert (script.parent / "config.yaml").exists() and script.stat().st_mode & 0o111
    assert (tmp_path / "nano" / "launch" / "failures").read_text().strip() == "0"


def test_chain_of_three_segments_with_afterany_dependencies(launch, fake_slurm, tmp_path):
    script, ids, out = submitted(launch, tmp_path / "nano", *NANO, "launch.chain=3")
    calls = fake_slurm.calls("sbatch")
    assert [c["job_id"] for c in calls] == ids and len(ids) == 3
    assert calls[0]["argv"] == ["--parsable", str(script)]
    for k in (1, 2):  # a command-line --dependency replaces the script's: singleton is repeated
        assert calls[k]["argv"] == ["--parsable", f"--dependency=afterany:{ids[k - 1]},singleton", str(script)]
    assert all("--no-requeue" in c["effective"] and "--requeue" not in c["effective"] for c in calls)
    assert " -> ".join(ids) in out


def test_a_refused_submission_is_reported_and_recorded(launch, fake_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    rc, _, err = launch(*NANO, f"trainer.run_dir={tmp_path / 'nano'}")
    assert rc == 1 and "sbatch refused segment 1" in err and "Invalid account" in err
    sub = json.loads((tmp_path / "nano" / "launch" / "submissions.jsonl").read_text())
    assert sub["job_ids"] == [] and "Invalid account" in sub["error"]


# ------------------------------------------------------------------------------------------ segment logic
def test_rendezvous_from_scontrol_and_a_finished_run_ends(launch, fake_slurm, tmp_path):
    script, (jid,), _ = submitted(launch, tmp_path / "nano", *NANO)
    rc, out = run_segment(fake_slurm, script, jid, nodelist="gpu[007-070]", nodes=64, FAKE_SRUN_EXIT="0")
    assert rc == 0, out
    (srun,) = fake_slurm.calls("srun")
    assert srun["env"]["MASTER_ADDR"] == "gpu007" and srun["env"]["MASTER_PORT"] == str(20000 + int(jid) % 10000)
    assert srun["opts"] == {"--nodes": "64", "--ntasks-per-node": "8", "--cpus-per-task": "14"}
    assert srun["env"]["NCCL_IB_TIMEOUT"] == "22" and srun["env"]["PYTHONUNBUFFERED"] == "1"
    assert ["show", "hostnames", "gpu[007-070]"] in [c["argv"] for c in fake_slurm.calls("scontrol")]
    assert [s["decision"] for s in segments(tmp_path / "nano")] == ["done"]
    assert (script.parent / "DONE").exists()
    rc, out = run_segment(fake_slurm, script, jid, FAKE_SRUN_EXIT="0")  # a later chain segment: nothing to do
    assert rc == 0 and "already finished" in out and len(fake_slurm.calls("srun")) == 1


def test_the_failure_cap_stops_a_crash_loop(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    script, (jid,), _ = submitted(launch, run_dir, *SMOKE)
    codes = [run_segment(fake_slurm, script, jid, restart=k, FAKE_SRUN_EXIT="1")[0] for k in range(3)]
    assert codes == [0, 0, 1]  # requeued twice, then given up
    requeues = [c["argv"] for c in fake_slurm.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == [["requeue", jid]] * 2
    segs = segments(run_dir)
    assert [(s["rc"], s["failures"], s["decision"]) for s in segs] == [(1, 1, "requeue"), (1, 2, "requeue"),
                                                                       (1, 3, "gave_up")]
    assert (run_dir / "launch" / "failures").read_text().strip() == "3"
    assert "3 segments in a row ended without a new checkpoint" in (script.parent / "GAVE_UP").read_text()
    rc, out = run_segment(fake_slurm, script, jid, restart=3, FAKE_SRUN_EXIT="1")  # SLURM requeued it anyway
    assert rc == 1 and "gave up" in out and len(fake_slurm.calls("srun")) == 3


def test_progress_resets_the_failure_count_and_a_new_submission_too(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    script, (jid,), _ = submitted(launch, run_dir, *SMOKE)
    for k in range(2):
        run_segment(fake_slurm, script, jid, restart=k, FAKE_SRUN_EXIT="1")
    marker = run_dir / "checkpoints" / "step_00000010" / "COMPLETE"  # this crash came after a checkpoint
    rc, _ = run_segment(fake_slurm, script, jid, restart=2, FAKE_SRUN_EXIT="1", FAKE_SRUN_TOUCH=str(marker))
    assert rc == 0
    assert [(s["step_before"], s["step_after"], s["failures"], s["decision"]) for s in segments(run_dir)][-1] == (
        -1, 10, 0, "requeue")
    run_segment(fake_slurm, script, jid, restart=3, FAKE_SRUN_EXIT="1")
    assert (run_dir / "launch" / "failures").read_text().strip() == "1"
    submitted(launch, run_dir, *SMOKE)
    assert (run_dir / "launch" / "failures").read_text().strip() == "0"


@pytest.mark.parametrize("code", [2, 5])
def test_fatal_exit_codes_are_not_requeued(launch, fake_slurm, tmp_path, code):
    script, (jid,), _ = submitted(launch, tmp_path / "run", *SMOKE)
    rc, out = run_segment(fake_slurm, script, jid, FAKE_SRUN_EXIT=str(code))
    assert rc == code and "would fail the same way" in out
    assert [s["decision"] for s in segments(tmp_path / "run")] == ["fatal"]
    assert not [c for c in fake_slurm.calls("scontrol") if c["argv"][0] == "requeue"]


def test_a_failed_requeue_is_reported(launch, fake_slurm, tmp_path):
    script, (jid,), _ = submitted(launch, tmp_path / "run", *SMOKE)
    rc, out = run_segment(fake_slurm, script, jid, FAKE_SRUN_EXIT="6", FAKE_REQUEUE_RC="1")
    assert rc == 1 and f"scontrol requeue {jid} failed: resubmit with sbatch {script}" in out


@pytest.mark.parametrize("chain,signals,decision,requeued", [
    (0, ("USR1",), "requeue", True),            # the time-limit notice: stop with a checkpoint, requeue
    (0, ("TERM",), "terminated", False),        # scancel / preemption: stop with a checkpoint, no requeue
    (0, ("USR1", "TERM"), "requeue", True),     # the notice, then the time limit's SIGTERM
    (2, ("USR1",), "next_segment", False),      # a chain: the next segment continues
])
def test_signals_reach_the_training_and_decide_the_next_step(launch, fake_slurm, tmp_path, chain, signals,
                                                             decision, requeued):
    run_dir = tmp_path / "run"
    script, ids, _ = submitted(launch, run_dir, *SMOKE, f"launch.chain={chain}")
    marker = run_dir / "checkpoints" / "step_00000004" / "COMPLETE"
    rc, out = run_segment(fake_slurm, script, ids[0], signals=signals, FAKE_SRUN_EXIT="1", FAKE_SRUN_SLEEP="60",
                          FAKE_SRUN_STOP_AFTER=str(len(signals)), FAKE_SRUN_TOUCH=str(marker))
    assert [c["signal"] for c in fake_slurm.calls("srun-signal")] == [f"SIG{x}" for x in signals]  # forwarded
    (seg,) = segments(run_dir)
    assert (seg["rc"], seg["step_after"], seg["decision"]) == (6, 4, decision), out
    assert bool([c for c in fake_slurm.calls("scontrol") if c["argv"][0] == "requeue"]) == requeued
    assert rc == (6 if decision == "terminated" else 0)


# ------------------------------------------------------------------------------------------ a real run
@pytest.mark.slow
@pytest.mark.distributed
def test_requeued_segments_continue_the_uninterrupted_loss_curve(launch, fake_slurm, tmp_path, local_run):
    """Segment 1 trains until SLURM's notice (SIGUSR1 to the batch shell), stops with a checkpoint and
    exit 6, and requeues its job; segment 2 (same job id, restart 1) resumes and finishes. Their losses
    are the uninterrupted local run's (same config, same 2 ranks), step for step."""
    full_dir, full = local_run
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    run_dir = tmp_path / "run"
    fake_slurm.start_ids_at(job_id_with_free_port())
    script, (jid,), _ = submitted(launch, run_dir, *SMOKE)

    proc = subprocess.Popen(["bash", str(script)], env=fake_slurm.segment_env(jid, restart=0),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(losses(run_dir)) >= 3, proc, timeout=180)
    proc.send_signal(signal.SIGUSR1)
    out1, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out1[-4000:]
    (seg1,) = segments(run_dir)
    stop = seg1["step_after"]
    assert (seg1["rc"], seg1["decision"], seg1["step_before"]) == (6, "requeue", -1), out1[-4000:]
    assert 3 <= stop < 30 and losses(run_dir)[-1][0] == stop
    assert [c["argv"] for c in fake_slurm.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", jid]]
    assert "stopped early at step" in out1 and "SIGUSR1" in " ".join(fake_slurm.calls("srun-exit")[0]["signals"])

    rc, out2 = run_segment(fake_slurm, script, jid, restart=1, timeout=240)
    assert rc == 0, out2[-4000:]
    seg2 = segments(run_dir)[1]
    assert (seg2["rc"], seg2["decision"], seg2["step_before"], seg2["restart"]) == (0, "done", stop, 1)
    assert f"resumed at step {stop}" in out2
    resumed, uninterrupted = losses(run_dir), losses(full_dir)
    assert [s for s, _ in resumed] == list(range(1, 31)) == [s for s, _ in uninterrupted]
    assert resumed == uninterrupted  # bit for bit: the resume restores model, optimizer, RNG and data position
