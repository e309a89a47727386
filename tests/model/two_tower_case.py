"""One TwoTower loss/gradient computation, runnable at any TP/EP/DP layout.

The single-process test computes it at TP=1 (the oracle); the torchrun worker
``dist/two_tower_equiv.py`` at TP=2 or EP=2 (which also makes DP=2: each DP rank takes its
half of the global batch). Gradients go through megatron-core's DDP and
``finalize_model_grads`` exactly as in training, then are gathered into full HF-named
tensors so that layouts can be compared.
"""

from __future__ import annotations

import torch

B, L, S, MASK = 4, 16, 4, 3


def run_case(ckpt_ctx: str, ckpt_den: str, parallel) -> tuple[float, dict[str, torch.Tensor]]:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from twotower.model.config import BackboneConfig
    from twotower.model.hf_export import export_hf_tensors
    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    cfg = BackboneConfig.from_hf(ckpt_ctx)
    import os
    model = build_two_tower(cfg, parallel, TwoTowerConfig(block_size=S, mask_token_id=MASK,
                                                          recompute=os.environ.get("TT_RECOMPUTE", "mamba")))
    load_hf_backbone(model.context_tower, ckpt_ctx)
    load_hf_backbone(model.denoiser_tower, ckpt_den)  # a "trained" denoiser differs from the context
    g = torch.Generator().manual_seed(0)
    from twotower.model.adaln import reset_time_conditioning

    # non-trivial time conditioning, identical on every rank (private, seeded generators)
    reset_time_conditioning(model.t_embedder, model.t_block, model.scale_shift_tables, "release", seed=7)
    x0 = torch.randint(4, cfg.vocab_size, (B, L), generator=g)
    t = torch.rand(B, L // S, generator=g) * 0.9 + 0.05
    masked = torch.rand(B, L, generator=g) < t.repeat_interleave(S, 1)
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)

    dev = next(model.parameters()).device  # the builder's device (CUDA under NCCL, else the CPU)
    x0, xt, t, masked = (v.to(dev) for v in (x0, xt, t, masked))
    dp = parallel_state.get_data_parallel_world_size()
    r = parallel_state.get_data_parallel_rank()
    rows = slice(r * B // dp, (r + 1) * B // dp)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    out = ddp(x0[rows], xt[rows], t[rows])
    loss = (out.ce * masked[rows]).sum() / out.ce.numel()  # per-rank mean; DDP averages over DP
    loss.backward()
    finalize_model_grads([ddp])

    grads = {k: p.main_grad for k, p in model.denoiser_tower.named_parameters()}
    full = export_hf_tensors(model.denoiser_tower, grads, prefix="denoiser.")
    full |= {f"{m}.{k}": p.main_grad.clone() for m, mod in model.time_conditioning_modules().items()
             for k, p in mod.named_parameters()}
    assert all(p.grad is None for p in model.context_tower.parameters())
    mean_loss = loss.detach().clone()
    if dp > 1:
        torch.distributed.all_reduce(mean_loss, group=parallel_state.get_data_parallel_group())
        mean_loss /= dp
    return float(mean_loss), full
