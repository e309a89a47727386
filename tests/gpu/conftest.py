"""Fixtures of the GPU tests (``tests/gpu``, every test marked ``gpu``: skipped without CUDA).

Run them with ``tests/gpu/run_on_device.sh`` on a CUDA machine (it installs megatron-core and, where
their wheels are carried, Transformer Engine, mamba-ssm and causal-conv1d). Tests that need one of
those packages skip, naming it, when it is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # gpu_cases
sys.path.insert(0, str(HERE.parent / "model"))  # hf_tiny, two_tower_case
sys.path.insert(0, str(HERE.parent / "training"))  # train_helpers


@pytest.fixture
def gpu_world1(monkeypatch):
    """A 1-process NCCL world on cuda:0 with megatron model parallel (tp=pp=ep=1)."""
    import torch

    from twotower.model.parallel_init import destroy_parallel, free_port, init_parallel

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    init_parallel(seed=1234)
    try:
        yield torch.device("cuda", torch.cuda.current_device())
    finally:
        destroy_parallel()
