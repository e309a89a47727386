"""The oracle for the vectorised TwoTower pass: one block at a time (test and benchmark helper)."""

from __future__ import annotations

import torch

from twotower.model.cache import TowerCache


def naive(model, x0, xt, t, S):
    """For each block, a plain causal context pass over the clean prefix, then the denoiser over
    that block alone, seeded with the prefix's final states. Returns logits ``[b, L, V]``."""
    out = []
    for blk in range(x0.shape[1] // S):
        if blk == 0:
            cache = TowerCache.empty(len(model.context_tower.layers))
        else:
            _, cache = model.context_forward(x0[:, : blk * S])
        out.append(model.denoise_block(xt[:, blk * S:(blk + 1) * S], t[:, blk], cache))
    return torch.cat(out, dim=1)
