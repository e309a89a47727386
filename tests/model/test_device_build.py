"""Every builder puts every parameter and buffer on the device it is given (by construction).

Built on ``meta``: a tensor created anywhere else (a CPU default, a ``.to()`` forgotten in a
sub-module, megatron's ``torch.cuda.current_device()`` allocations) shows up as not-meta. Every
model kind and every spec provider this host has (``local`` here; ``transformer_engine`` on a GPU
host with TE: tests/gpu/).
"""

from __future__ import annotations

import pytest
import torch

from twotower.model import backends
from twotower.model.backbone import build_backbone
from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.two_tower import TwoTowerConfig, build_two_tower

CFG = BackboneConfig(pattern="M*E-", vocab_size=64, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8,
                     ffn_hidden_size=48, num_experts=4, moe_topk=2, moe_ffn_hidden_size=16,
                     moe_shared_expert_intermediate_size=24)
IMPLS = [i for i in ("local", "transformer_engine") if backends.unavailable(i) is None]


def _off_device(model: torch.nn.Module, device: str) -> list[str]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors, "no tensors at all"
    return [f"{n} on {t.device}" for n, t in tensors if t.device.type != device]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backbone_and_two_tower_on_meta(megatron_world1, impl, dtype):
    par = ParallelConfig(transformer_impl=impl, attention_backend="sdpa", ssm_backend="torch")
    backbone = build_backbone(CFG, par, params_dtype=dtype, device="meta")
    assert _off_device(backbone, "meta") == []
    assert {n for n, _ in backbone.named_buffers()} >= {"bad_id_count"}
    assert any("expert_bias" in n for n, _ in backbone.named_buffers())  # megatron's router buffers too
    two = build_two_tower(CFG, par, TwoTowerConfig(block_size=4), params_dtype=dtype, device="meta")
    assert _off_device(two, "meta") == []
    floats = [p for p in two.parameters() if p.is_floating_point()]
    assert {p.dtype for p in floats} == {dtype}  # built in params_dtype: no model-wide .to() afterwards


def test_pipeline_stages_on_meta(megatron_world1):
    par = ParallelConfig(attention_backend="sdpa", ssm_backend="torch")
    for kw in ({"pre_process": True, "post_process": False, "layer_range": (0, 2)},
               {"pre_process": False, "post_process": True, "layer_range": (2, 4)}):
        assert _off_device(build_two_tower(CFG, par, TwoTowerConfig(block_size=4), device="meta", **kw), "meta") == []


def test_cpu_build_is_on_cpu_and_runs(megatron_world1):
    """The same builders on an explicit CPU device give a working model (the meta test's control)."""
    par = ParallelConfig(attention_backend="sdpa", ssm_backend="torch")
    model = build_two_tower(CFG, par, TwoTowerConfig(block_size=4), device="cpu")
    assert _off_device(model, "cpu") == [] and _off_device(model, "meta")  # the check can fail
    x0 = torch.randint(4, 64, (2, 8))  # not the mask id 3 (SUBS: its CE is inf)
    out = model(x0, x0, torch.full((2, 1), 0.5))
    assert out.ce.shape == (2, 8) and torch.isfinite(out.ce).all()


def test_deferred_id_check_counts_on_device_without_raising(megatron_world1):
    model = build_backbone(CFG, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"), device="cpu")
    bad = torch.tensor([[1, 64, -1, 5]])
    with pytest.raises(ValueError, match="out of range"):
        model(bad)
    model.defer_id_check = True
    model(bad)
    model(torch.tensor([[70, 2, 3, 4]]))
    assert model.take_bad_id_count() == 3 and model.take_bad_id_count() == 0
