"""``cluster=local``: the same job script, with torchrun in place of srun, run segment after segment."""

from __future__ import annotations

import io
import json

import pytest
from launch_helpers import STEPS, losses

from twotower.launch.cli import compose
from twotower.launch.job import build_job
from twotower.launch.local import run_local
from twotower.launch.script import RERUN_EXIT


@pytest.mark.slow
@pytest.mark.distributed
def test_local_preset_really_trains_with_two_processes(local_run):
    run_dir, proc = local_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP1 PP1 EP1 DP2" in proc.stdout  # two ranks, data parallel
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    (sub,) = [json.loads(x) for x in (run_dir / "launch" / "submissions.jsonl").read_text().splitlines()]
    assert (sub["mode"], sub["cluster"], sub["world_size"], sub["experiment"]) == ("local", "local", 2, "smoke_cpu")
    (seg,) = [json.loads(x) for x in (run_dir / "launch" / "segments.jsonl").read_text().splitlines()]
    assert (seg["rc"], seg["decision"], seg["step_before"], seg["step_after"]) == (0, "done", -1, STEPS)
    log = (run_dir / "launch" / sub["submission"] / "local.out").read_text()
    assert f"step {STEPS}/{STEPS}" in log and "training finished" in log
    assert (run_dir / "launch" / sub["submission"] / "DONE").exists()


def test_the_local_runner_reruns_while_the_script_asks(tmp_path):
    """Exit 75 from job.sh = 'stopped with a checkpoint, run me again' (where SLURM would requeue)."""
    node, experiment = compose(["experiment=smoke_cpu", f"trainer.run_dir={tmp_path / 'run'}"])
    spec = build_job(node, experiment=experiment, overrides=[], cwd=tmp_path)
    spec.sub_dir.mkdir(parents=True)
    script = spec.sub_dir / "job.sh"
    count = tmp_path / "count"
    script.write_text(f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}; echo "segment $n"\n'
                      f'(( n < 3 )) && exit {RERUN_EXIT}; exit 0\n')
    out = io.StringIO()
    assert run_local(spec, script, stream=out) == 0
    assert count.read_text().strip() == "3"
    assert "starting segment 2" in out.getvalue() and "starting segment 3" in out.getvalue()
    assert (spec.sub_dir / "local.out").read_text().splitlines() == ["segment 1", "segment 2", "segment 3"]
