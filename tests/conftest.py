"""Shared pytest setup: markers, the CPU megatron runtime, small helpers for torchrun tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    if not torch.cuda.is_available():
        # The CPU runtime layer for megatron, applied explicitly before any test module imports
        # megatron (importing twotower patches nothing: tests/model/test_import_hygiene.py).
        from twotower.model import megatron_cpu

        megatron_cpu.apply()
    config.addinivalue_line("markers", "slow: more than ~20 s on 2 CPU cores (still run in CI)")
    config.addinivalue_line("markers", "distributed: launches torchrun with several gloo ranks")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped on CPU machines)")
    # The third-party notices the CLIs silence (twotower.training.quiet) would bury real warnings.
    import re

    from twotower.training.quiet import KNOWN

    for prefix, category in KNOWN:
        config.addinivalue_line("filterwarnings", f"ignore:{re.escape(prefix)}:{category.__name__}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """CPU host: ``gpu`` tests are skipped. CUDA host: the CPU suite (gloo worlds, the CPU runtime
    layer, CPU-exact oracles) is skipped, not failed; set ``TWOTOWER_CPU_TESTS_ON_GPU=1`` to run it."""
    import torch

    if torch.cuda.is_available():
        if os.environ.get("TWOTOWER_CPU_TESTS_ON_GPU") == "1":
            return
        skip_cpu = pytest.mark.skip(reason="CPU suite on a CUDA host (TWOTOWER_CPU_TESTS_ON_GPU=1 runs it)")
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip_cpu)
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------------------------------
# Distributed helpers (shared by every distributed test of the project)
# --------------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_SCRIPTS = REPO_ROOT / "tests" / "model" / "dist"


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: Path | str,
    nproc: int = 2,
    args: tuple | list = (),
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc script *args`` (gloo on CPU).

    A relative ``script`` is looked up in ``tests/model/dist/``. Uses a free rendezvous port,
    ``OMP_NUM_THREADS=1`` and captures stdout+stderr (merged, in ``.stdout``). With ``check`` a
    non-zero exit or a timeout fails the calling test with the ranks' output.
    """
    script = Path(script)
    if not script.is_absolute():
        script = DIST_SCRIPTS / script
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args),
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"torchrun {script.name} timed out after {timeout}s\n{out[-20000:]}", pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {script.name} exited {proc.returncode}\n{proc.stdout[-20000:]}", pytrace=False)
    return proc


@pytest.fixture
def torchrun():
    """The :func:`run_torchrun` helper as a fixture: ``torchrun("my_script.py", nproc=2, args=[...])``."""
    return run_torchrun


@pytest.fixture
def megatron_world1(monkeypatch):
    """A 1-process gloo world + megatron model parallel (tp=pp=ep=1, seed 1234); torn down after.

    Yields megatron's ``parallel_state``.
    """
    import torch

    from twotower.model import parallel_init

    if torch.distributed.is_initialized():
        pytest.fail("megatron_world1: torch.distributed is already initialised (a leaked process group)")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    parallel_init.init_parallel(tp=1, ep=1, pp=1, seed=1234)
    from megatron.core import parallel_state

    try:
        yield parallel_state
    finally:
        parallel_init.destroy_parallel()
