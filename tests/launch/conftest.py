"""Fixtures of the launcher tests: SLURM stand-ins on PATH, the launcher in-process, and one real
uninterrupted local run (2 CPU processes) that other tests compare against."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_slurm import FakeSlurm
from launch_helpers import TINY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> FakeSlurm:
    """The stand-ins, first on PATH for this test (and every process it starts)."""
    fake = FakeSlurm(tmp_path / "slurm").install()
    for k, v in fake.env().items():
        monkeypatch.setenv(k, v)
    return fake


@pytest.fixture
def launch(capsys):
    """``launch(*overrides) -> (exit status, stdout, stderr)``: ``twotower-launch`` in this process."""
    from twotower.launch.cli import main

    def run(*overrides: str):
        rc = main(list(overrides))
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    """``twotower-launch experiment=smoke_cpu cluster=local cluster.tasks_per_node=2`` as a user runs it
    (a subprocess): a real 2-process CPU training, uninterrupted. -> (run dir, CompletedProcess)."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "twotower.launch", *TINY, "cluster=local", "cluster.tasks_per_node=2",
                           f"trainer.run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    return run_dir, proc
