"""Bad input is refused with a message naming what to change, before anything is written or submitted."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

NANO = ["experiment=twotower_nano_2p1t", "cluster=slurm_h100", "cluster.account=proj_tt", "cluster.partition=gpu"]


@pytest.mark.parametrize("overrides,code,message", [
    # nodes x GPUs that do not match the parallel layout / the batch
    (NANO + ["cluster.nodes=3"], 2, r"cluster\.nodes=3 x 8 processes per node = 24 ranks do not fit .*parallel\.ep=16"),
    (NANO + ["parallel.tp=3"], 2, r"= 512 ranks do not fit .*parallel\.tp=3"),
    (["experiment=smoke_cpu", "cluster.tasks_per_node=3"], 2,
     r"= 3 ranks do not fit .*trainer\.global_batch_size=4 is not divisible"),
    (NANO + ["cluster.tasks_per_node=4"], 2, r"cluster\.tasks_per_node=4 with cluster\.gpus_per_node=8"),
    (["experiment=smoke_cpu", "cluster.nodes=2"], 2, r"cluster\.nodes=2 with cluster\.scheduler=local"),
    # a SLURM preset without account or partition
    (NANO + ["cluster.account=null"], 2, r"cluster\.account is not set for the SLURM preset cluster=slurm_h100"),
    (NANO + ["cluster.partition=null"], 2, r"cluster\.partition is not set"),
    # unknown experiment, cluster or key
    (["experiment=nano_typo"], 2, r"Could not find 'experiment/nano_typo'.*twotower_nano_2p1t"),
    (NANO + ["cluster=slurm_a100"], 2, r"Could not find 'cluster/slurm_a100'.*slurm_h100"),
    (NANO + ["launch.chian=3"], 2, r"launch\.chian"),
    # values
    (NANO + ["launch.chain=-1"], 2, r"launch\.chain=-1 must be >= 0"),
    (NANO + ["cluster.time=4h"], 2, r"cluster\.time='4h'"),
    (NANO + ["cluster.time=00:04:00"], 2, r"launch\.signal_seconds=300 is not shorter than cluster\.time"),
    (NANO + ["checkpoint.resume=none"], 2, r"checkpoint\.resume=none: launched jobs run with checkpoint\.resume=auto"),
    # a layout that does not fit the GPUs (the planner; exit 3 as twotower-train --plan)
    (NANO + ["parallel.ep=1"], 3, r"the plan does not fit .*exceeds gpu_mem_gib=80"),
])
def test_bad_input_is_refused_before_anything_happens(launch, fake_slurm, tmp_path, overrides, code, message):
    run_dir = tmp_path / "run"
    rc, _, err = launch(*overrides, f"trainer.run_dir={run_dir}")
    assert rc == code, err
    assert err.startswith("twotower-launch: ")
    assert re.search(message, err, re.DOTALL), err
    assert not run_dir.exists() and fake_slurm.calls() == []


def test_a_run_dir_of_another_experiment_is_refused(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "launch").mkdir(parents=True)
    (run_dir / "launch" / "submissions.jsonl").write_text(json.dumps({"experiment": "demo", "job_ids": ["7"]}) + "\n")
    rc, _, err = launch("experiment=smoke_cpu", f"trainer.run_dir={run_dir}", "launch.dry_run=true")
    assert rc == 2 and "belongs to experiment=demo" in err and "experiment=smoke_cpu" in err
    assert sorted(p.name for p in (run_dir / "launch").iterdir()) == ["submissions.jsonl"]


def test_a_run_dir_of_another_model_is_refused(launch, fake_slurm, tmp_path):
    """No launch records, but a trainer's config.yaml of another model: its checkpoints would be resumed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"objective": "diffusion", "model": {"hidden_size": 4096}}))
    rc, _, err = launch("experiment=smoke_cpu", f"trainer.run_dir={run_dir}")
    assert rc == 2 and "holds a run of another model" in err and "model.hidden_size: 4096 there, 96 here" in err
    assert not (run_dir / "launch").exists() and fake_slurm.calls() == []


def test_the_same_experiment_may_relaunch_into_its_run_dir(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):
        rc, _, err = launch(*NANO, f"trainer.run_dir={run_dir}")
        assert rc == 0, err
    subs = [json.loads(x) for x in (run_dir / "launch" / "submissions.jsonl").read_text().splitlines()]
    assert [s["experiment"] for s in subs] == ["twotower_nano_2p1t"] * 2
    assert subs[0]["submission"] != subs[1]["submission"] and len(fake_slurm.calls("sbatch")) == 2


def test_missing_sbatch_is_refused_unless_dry_run(launch, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("sbatch"):
        pytest.skip("this machine has a real sbatch in /usr/bin or /bin")
    run_dir = tmp_path / "run"
    rc, _, err = launch(*NANO, f"trainer.run_dir={run_dir}")
    assert rc == 2 and "sbatch is not on PATH" in err and "launch.dry_run=true" in err
    assert not run_dir.exists()
    rc, out, err = launch(*NANO, f"trainer.run_dir={run_dir}", "launch.dry_run=true")
    assert rc == 0 and "#SBATCH --requeue" in out


def test_warnings_do_not_block(launch, fake_slurm, tmp_path):
    rc, _, err = launch(*NANO, f"trainer.run_dir={tmp_path / 'run'}", "checkpoint.interval=0",
                        "cluster.container_image=/img.sqsh", "launch.dry_run=true")
    assert rc == 0
    assert "checkpoint.interval=0" in err and "is under none of cluster.container_mounts" in err
