"""The job script of ``experiment=twotower_nano_2p1t cluster=slurm_h100``, field by field, and the
frozen config every segment trains."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twotower.launch.cli import compose
from twotower.launch.job import build_job, time_limit_seconds
from twotower.launch.script import FATAL_CODES, RERUN_EXIT, render
from twotower.training.train import ExitCode

NANO = ["experiment=twotower_nano_2p1t", "cluster=slurm_h100", "cluster.account=proj_tt", "cluster.partition=gpu_h100",
        "cluster.qos=high", "cluster.time=02:00:00", "launch.signal_seconds=240"]


def spec_of(*overrides: str, cwd: Path | None = None):
    node, experiment = compose(list(overrides))
    return build_job(node, experiment=experiment, overrides=list(overrides), cwd=cwd)


def directives(text: str) -> dict[str, str]:
    """``#SBATCH`` lines as SLURM reads them: up to the first command."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            assert key not in out, f"{key} twice"
            out[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return out


def train_array(text: str) -> list[str]:
    return shlex.split(re.search(r"^TRAIN=\((.*)\)$", text, re.MULTILINE)[1])


def bash_n(text: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(text)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_nano_script_has_the_resources_requeue_signal_and_srun_lines(tmp_path):
    spec = spec_of(*NANO, f"trainer.run_dir={tmp_path / 'nano'}", cwd=tmp_path)
    text = render(spec)
    bash_n(text, tmp_path)
    c = spec.cluster
    assert (c.nodes, c.gpus_per_node, c.cpus_per_node) == (64, 8, 112)  # the experiment's 512 H100s
    assert directives(text) == {
        "--job-name": spec.job_name, "--account": "proj_tt", "--partition": "gpu_h100", "--qos": "high",
        "--nodes": "64", "--ntasks-per-node": "8", "--gpus-per-node": "8", "--cpus-per-task": "14",
        "--mem": "0", "--time": "02:00:00", "--exclusive": "", "--requeue": "", "--signal": "B:USR1@240",
        "--dependency": "singleton", "--open-mode": "append", "--output": f"{spec.sub_dir}/slurm-%j.out",
        "--chdir": str(tmp_path),
    }
    assert spec.job_name.startswith("tt-nano-") and spec.sub_dir.parent == tmp_path / "nano" / "launch"
    train = train_array(text)
    assert train[:4] == ["srun", "--nodes=64", "--ntasks-per-node=8", "--cpus-per-task=14"]
    assert train[4:] == [sys.executable, "-m", "twotower.training.train", f"--config-path={spec.sub_dir}",
                         "--config-name=config"]  # no container, no setup lines: this interpreter
    assert not any(a.startswith("--container") for a in train)
    # rendezvous from SLURM's own host list; the requeue call; the exported NCCL/CUDA environment
    assert 'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    for key, value in c.env.items():
        assert f"export {key}={shlex.quote(value)}" in text
    assert "MODE=requeue" in text and "MAX_FAILURES=3" in text and "FORWARD_USR1=USR1" in text


def test_container_chain_and_site_options(tmp_path):
    spec = spec_of(*NANO, f"trainer.run_dir={tmp_path / 'nano'}", "cluster.container_image=/img/tt.sqsh",
                   "cluster.container_mounts=[/lustre:/lustre,/data:/data]", "launch.chain=4",
                   "cluster.sbatch_args=['--constraint=h100']", "cluster.srun_args=['--cpu-bind=none']",
                   "launch.max_failures=5", "launch.job_name=nano-p1", cwd=tmp_path)
    text = render(spec)
    bash_n(text, tmp_path)
    d = directives(text)
    assert "--requeue" not in d and d["--no-requeue"] == "" and d["--dependency"] == "singleton"
    assert d["--job-name"] == "nano-p1" and d["--constraint"] == "h100"
    train = train_array(text)
    assert {"--container-image=/img/tt.sqsh", "--container-mounts=/lustre:/lustre,/data:/data",
            f"--container-workdir={tmp_path}", "--cpu-bind=none"} <= set(train)
    assert train[train.index("--cpu-bind=none") + 1] == "python"  # the container's interpreter
    assert "MODE=chain" in text and "MAX_FAILURES=5" in text


def test_local_script_runs_torchrun_and_has_no_sbatch_lines(tmp_path):
    spec = spec_of("experiment=smoke_cpu", "cluster.tasks_per_node=2", f"trainer.run_dir={tmp_path / 'r'}")
    text = render(spec)
    bash_n(text, tmp_path)
    assert spec.mode == "local" and directives(text) == {}
    train = train_array(text)
    assert train[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m",
                          "twotower.training.train"]
    assert "FORWARD_USR1=TERM" in text  # torchrun's agent would die of SIGUSR1


def test_the_frozen_config_is_what_twotower_train_composes(tmp_path, monkeypatch):
    """Every segment runs `twotower-train --config-path SUB --config-name config`: the same dataclasses,
    resolved at submission (absolute dirs, ${oc.env:...} of the submitting shell), resume=auto."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from twotower.training.config import register_configs, to_train_config

    monkeypatch.setenv("TWOTOWER_BACKBONE", "/site/backbone")
    spec = spec_of(*NANO, "trainer.run_dir=runs/p1", cwd=tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.yaml").write_text(spec.train_config_yaml())
    monkeypatch.delenv("TWOTOWER_BACKBONE")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path / "sub"), version_base="1.3"):
        cfg = hydra_compose(config_name="config")
    GlobalHydra.instance().clear()
    trained = to_train_config(cfg)
    assert OmegaConf.to_container(OmegaConf.structured(trained)) == OmegaConf.to_container(
        OmegaConf.structured(spec.cfg))
    assert trained.backbone == "/site/backbone" and trained.checkpoint.resume == "auto"
    assert trained.trainer.run_dir == str(tmp_path / "runs" / "p1")
    assert trained.checkpoint.dir == str(tmp_path / "runs" / "p1" / "checkpoints")
    head = yaml.safe_load(spec.train_config_yaml())
    assert head["hydra"]["run"]["dir"] == str(tmp_path / "runs" / "p1") and head["defaults"][0] == "config_schema"


def test_dry_run_prints_script_plan_and_config_and_writes_nothing(launch, fake_slurm, tmp_path):
    run_dir = tmp_path / "nano"
    rc, out, err = launch(*NANO, f"trainer.run_dir={run_dir}", "launch.dry_run=true")
    assert rc == 0, err
    assert "#SBATCH --signal=B:USR1@240" in out and "srun --nodes=64" in out
    assert "sbatch --parsable" in out
    assert "fits" in out and "data-parallel size" in out  # the planner's table for 512 x H100
    assert "tokens_budget: 1500000000000.0" in out  # the resolved config
    assert not run_dir.exists() and fake_slurm.calls() == []


def test_exit_code_protocol_matches_twotower_train():
    assert [int(c) for c in FATAL_CODES] == [2, 3, 4, 5]
    assert int(ExitCode.STOPPED_EARLY) == 6 and int(ExitCode.STOPPED_EARLY) not in FATAL_CODES
    assert RERUN_EXIT not in {int(c) for c in ExitCode}


@pytest.mark.parametrize("limit,seconds", [("04:00:00", 14400), ("90", 5400), ("10:30", 630), ("1-00:30", 88200),
                                           ("2-12", 216000), ("1-02:03:04", 93784)])
def test_time_limits_parse_like_slurm(limit, seconds):
    assert time_limit_seconds(limit) == seconds


def test_bash_is_available():
    assert shutil.which("bash"), "the job scripts are bash"
