"""``twotower-launch status``: checkpoint, progress against the budget, last metrics, ETA, job states."""

from __future__ import annotations

import json

import pytest
import yaml
from launch_helpers import STEPS


def fake_run(run_dir, *, steps=20, max_steps=100):
    """A run directory as a trainer and two submissions leave it (4 x 64 tokens a step)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "trainer": {"max_steps": max_steps, "global_batch_size": 4, "seq_len": 64, "tokens_budget": 0.0},
        "checkpoint": {"dir": str(run_dir / "ckpt")}}))
    rows = [{"step": s, "time": 1.7e9 + s, "loss": 5.0 - s / 10, "tokens": 256 * s, "tokens_per_s": 1000.0 + s,
             "mfu": 0.41} for s in range(1, steps + 1)]
    rows.append({"step": steps, "time": 1.7e9 + steps, "val/nelbo": 3.25})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo')
    for step, complete in ((10, True), (20, False)):  # step 20's save was cut: not a checkpoint
        (run_dir / "ckpt" / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (run_dir / "ckpt" / f"step_{step:08d}" / "COMPLETE").write_text(f"{step}\n")
    launch = run_dir / "launch"
    (launch / "sub2").mkdir(parents=True)
    (launch / "submissions.jsonl").write_text(
        json.dumps({"submission": "sub1", "experiment": "smoke_cpu", "job_ids": ["5000"]}) + "\n"
        + json.dumps({"submission": "sub2", "experiment": "smoke_cpu", "job_ids": ["5001", "5002"]}) + "\n")
    (launch / "segments.jsonl").write_text(json.dumps({"job_id": "5001", "restart": 0, "rc": 6, "step_before": -1,
                                                       "step_after": 10, "decision": "requeue"}) + "\n")
    (launch / "failures").write_text("0\n")


def test_status_reports_progress_eta_and_job_states(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    for jid, state in (("5000", "COMPLETED"), ("5001", "RUNNING"), ("5002", "PENDING")):
        fake_slurm.set_state(jid, state)
    rc, out, err = launch("status", f"run_dir={run_dir}", "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["checkpoint"] == {"step": 10, "path": str(run_dir / "ckpt" / "step_00000010")}
    assert (s["step"], s["max_steps"], s["tokens"], s["tokens_budget"]) == (20, 100, 5120, 25600)
    assert s["last"]["loss"] == pytest.approx(3.0) and s["last"]["mfu"] == 0.41
    assert s["recent_tokens_per_s"] == pytest.approx(1015.5)  # median of steps 11..20
    assert s["eta_s"] == pytest.approx((25600 - 5120) / 1015.5)
    assert s["jobs"] == [{"job_id": "5000", "state": "COMPLETED"}, {"job_id": "5001", "state": "RUNNING"},
                         {"job_id": "5002", "state": "PENDING"}]
    assert s["validation"] == {"val/nelbo": 3.25} and s["segments"][0]["decision"] == "requeue"
    rc, text, _ = launch("status", str(run_dir))  # the human table, run dir given bare
    assert rc == 0
    for line in ("checkpoint     step 10:", "step 20 / 100, tokens 5120 / 2.56e+04 (20.0%)", "MFU 41.0%",
                 "5001 RUNNING", "exit 6, checkpoint step -1 -> 10: requeue", "ETA            0:00:20"):
        assert line in text, text


def test_status_without_slurm_tools_or_metrics(launch, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    (run_dir / "metrics.jsonl").unlink()
    rc, out, _ = launch("status", f"run_dir={run_dir}", "--json")
    s = json.loads(out)
    assert rc == 0 and s["step"] is None and s["eta_s"] is None
    assert {j["state"] for j in s["jobs"]} == {"unknown (no squeue/sacct answer)"}
    rc, _, err = launch("status", f"run_dir={tmp_path / 'nope'}")
    assert rc == 2 and "does not exist" in err


def test_status_finds_the_run_dir_from_the_launch_overrides(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    rc, out, _ = launch("status", "experiment=smoke_cpu", f"trainer.run_dir={run_dir}", "--json")
    assert rc == 0 and json.loads(out)["run_dir"] == str(run_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_status_of_the_local_run(launch, local_run):
    run_dir, proc = local_run
    assert proc.returncode == 0
    rc, out, _ = launch("status", f"run_dir={run_dir}", "--json")
    s = json.loads(out)
    assert rc == 0 and (s["checkpoint"]["step"], s["step"], s["eta_s"]) == (STEPS, STEPS, 0.0)
    assert s["marks"].keys() == {"DONE"} and s["experiment"] == "smoke_cpu" and s["jobs"] == []
