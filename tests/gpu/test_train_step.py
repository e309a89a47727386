"""One-GPU training steps through the Trainer (bf16, Float16Module, megatron DDP with overlapped
gradient reduce and parameter gather, the distributed optimizer) for both objectives and every
backend installed here, and resume exactness on the FusedAdam path."""

from __future__ import annotations

import json

import pytest
import torch
from gpu_cases import needs, train_overrides
from train_helpers import compose

from twotower.model import backends

pytestmark = pytest.mark.gpu


def _train(overrides: list[str]) -> list[dict]:
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    tr = None
    try:
        tr = Trainer(compose(*overrides))
        assert tr.device.type == "cuda" and tr.ddp_config.overlap_grad_reduce
        assert all(p.is_cuda for p in tr.model.parameters())
        tr.train()
    finally:
        if tr is not None:
            tr.close()
        destroy_parallel()
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.run_dir="))
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("ssm", ["torch", "mamba_ssm"])
def test_one_gpu_step(tmp_path, monkeypatch, objective, impl, ssm):
    for b in (impl, ssm):
        if backends.unavailable(b):
            pytest.skip(f"{b}: {backends.unavailable(b)}")
    monkeypatch.setenv("WORLD_SIZE", "1")
    rows = _train(train_overrides(tmp_path / "run", objective, impl, ssm))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in rows), rows


@needs("transformer_engine")
def test_resume_is_exact_on_the_fused_adam_path(tmp_path, monkeypatch):
    """TE's FusedAdam keeps ``step`` in param_groups (megatron's own path, no CPU bug fix): 2 steps,
    save, 2 more in a fresh Trainer == 4 uninterrupted steps."""
    from megatron.core.optimizer import distrib_optimizer

    assert distrib_optimizer.HAVE_APEX_OR_TE
    monkeypatch.setenv("WORLD_SIZE", "1")
    base = ["trainer.max_steps=4", "checkpoint.resume=auto", "optim.distributed_optimizer=true"]
    straight = _train(train_overrides(tmp_path / "a", "diffusion", "auto", "auto", *base))
    first = _train(train_overrides(tmp_path / "b", "diffusion", "auto", "auto", *base, "trainer.exit_after_steps=2",
                                   "checkpoint.interval=2"))
    resumed = _train(train_overrides(tmp_path / "b", "diffusion", "auto", "auto", *base))
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in resumed][-2:] == [3, 4]
    assert [r["loss"] for r in straight] == [r["loss"] for r in first] + [r["loss"] for r in resumed][-2:]
