"""Per-layer state of a tower after it consumed a clean prefix (KV cache + Mamba states).

Stage: decoding, and the naive block-loop reference of the vectorised training pass.
Produced by ``TwoTowerModel.context_forward``; read by ``TwoTowerModel.denoise_block``:
denoiser layer ``i`` attends over ``layers[i].k/v`` and seeds its scan from
``layers[i].ssm/conv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    """Attention layers: ``k, v [b, ng_l, P, d]``. Mamba layers: ``ssm [b, nh_l, p, n]`` (fp32)
    and ``conv [b, conv_l, k-1]``. Other layers keep nothing."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
    conv: torch.Tensor | None = None


@dataclass
class TowerCache:
    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0
    """Number of clean tokens consumed."""

    @classmethod
    def empty(cls, num_layers: int) -> TowerCache:
        return cls([LayerCache() for _ in range(num_layers)], 0)

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        c = self.layers[i]
        return None if c.k is None else (c.k, c.v)

    def to(self, device: torch.device | str) -> TowerCache:
        move = (lambda t: None if t is None else t.to(device))
        return TowerCache([LayerCache(move(c.k), move(c.v), move(c.ssm), move(c.conv)) for c in self.layers],
                          self.length)
