"""Every parameter of a trainable backbone receives a gradient; a frozen one receives none."""

from __future__ import annotations

import torch

from twotower.model.backbone import build_backbone
from twotower.model.config import BackboneConfig, ParallelConfig


def _model():
    cfg = BackboneConfig(pattern="M*E-M", num_experts=4, moe_topk=2)
    torch.manual_seed(0)
    return cfg, build_backbone(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"))


def test_every_parameter_gets_a_gradient(megatron_world1):
    cfg, model = _model()
    # 4 sequences x 24 tokens: with 2-of-4 routing every expert sees tokens (checked below)
    ids = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    model(ids, labels=torch.roll(ids, -1, 1)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() == 0]
    assert not missing, f"no gradient for {missing}"
    assert not zero, f"all-zero gradient for {zero}"


def test_frozen_stack_has_no_gradients(megatron_world1):
    cfg, model = _model()
    model.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    out = model(ids)
    assert not out.requires_grad
    assert all(p.grad is None for p in model.parameters())
