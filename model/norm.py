"""RMSNorm and the Mamba-2 gated, group-wise RMSNorm.

Stage: every layer's pre-norm, the final norm, and the Mamba mixer's output norm.
Inputs ``x: [..., hidden]``; outputs the same shape and dtype.

Why not megatron's ``WrappedTorchNorm``: it refuses sequence parallelism. Under SP a norm sees
only its sequence shard, so its weight gradient is partial on each TP rank; megatron's
``finalize_model_grads`` all-reduces exactly the parameters flagged ``.sequence_parallel``,
which we set here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as HF NemotronH)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.weight.sequence_parallel = sequence_parallel  # read by megatron's finalize_model_grads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Mamba-2 output norm: ``norm_g(y * silu(z)) * w`` with statistics per group of channels.

    The groups are the SSM's B/C groups, so under TP (which shards whole groups) every rank
    normalises complete groups and no communication is needed. Gate before norm
    (``norm_before_gate=False`` in mamba-ssm terms), as Nemotron-H does.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"gated norm: hidden {hidden_size} is not a multiple of group size {group_size}")
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        *lead, d = h.shape
        g = h.view(*lead, d // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        # HF multiplies after casting back to the input dtype; keep that order for bit parity.
        return self.weight * g.view(*lead, d).to(dtype)
