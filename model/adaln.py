"""adaLN-single time conditioning (PixArt-alpha, Chen et al. 2023, Sec. 2.3) for the denoiser.

Stage: denoiser tower, once per forward. Input: the diffusion time of every block
``t: [b, n_blocks]`` in [0, 1]. Output: per-layer modulation ``(shift, scale, gate)`` for
every token, each ``[s(/tp), b, h]``.

One small network is shared by all layers::

    e   = sinusoid(1000 t)                      [b, nb, 256]
    mod = W2 silu(W1 e + b1) + b2               [b, nb, 3h]
    mod_i = mod + offset_i                      (one learned [3h] offset per layer)

and layer ``i`` computes (the modulation sits *after* the layer's pre-norm, as in PixArt,
and the gate multiplies the mixer output on the residual branch)::

    x <- x + (1 + gate_i) * mixer_i((1 + scale_i) * rmsnorm_i(x) + shift_i)

``W2``, ``b2`` and the offsets start at zero, so an untrained denoiser computes exactly the
backbone's function (shift 0, scale 0, gate factor 1). At 30B-A3B scale (h = 2688, 52
layers, time width 128) this adds ~1.49M parameters.

Under sequence parallelism every TP rank sees only its sequence shard, so these
replicated parameters get partial gradients: they carry ``.sequence_parallel`` so that
megatron's ``finalize_model_grads`` all-reduces them, as it does for the norms.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Modulation:
    """``(shift, scale, gate)`` for one layer, each ``[s(/tp), b, h]`` (or broadcastable)."""

    __slots__ = ("gate", "scale", "shift")

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        self.shift, self.scale, self.gate = shift, scale, gate

    def pre(self, normed: torch.Tensor) -> torch.Tensor:
        """Applied to the pre-normed layer input, before the mixer."""
        return normed * (1 + self.scale) + self.shift

    def post(self, mixer_out: torch.Tensor) -> torch.Tensor:
        """Applied to the mixer output, before the residual add."""
        return mixer_out * (1 + self.gate)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``1000 t`` (DiT convention): ``[...] -> [..., dim]`` fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNSingle(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, time_dim: int = 128, freq_dim: int = 256,
                 sequence_parallel: bool = False, seed: int = 0):
        super().__init__()
        self.hidden_size, self.freq_dim = hidden_size, freq_dim
        self.fc1 = nn.Linear(freq_dim, time_dim)
        self.fc2 = nn.Linear(time_dim, 3 * hidden_size)
        self.layer_offsets = nn.Parameter(torch.zeros(num_layers, 3 * hidden_size))
        # A private generator: the init must not depend on how much of the global RNG the
        # (layout-dependent) tower construction consumed, or TP/EP/PP runs would diverge.
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=g) * 0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # identity at init: shift = scale = gate = 0
        nn.init.zeros_(self.fc2.bias)
        for p in self.parameters():
            p.sequence_parallel = sequence_parallel

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """``t [b, nb]`` -> shared modulation ``[b, nb, 3h]`` (fp32 math, cast to the weights' dtype)."""
        e = timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(torch.nn.functional.silu(self.fc1(e)))

    def per_token(self, t: torch.Tensor, block_size: int, seq_slice: slice | None = None) -> torch.Tensor:
        """``t [b, nb]`` -> ``[s, b, 3h]`` with each block's vector repeated over its tokens.

        ``seq_slice`` keeps only this rank's sequence shard (sequence parallelism).
        """
        mod = self.shared(t).repeat_interleave(block_size, dim=1)  # [b, nb*S, 3h]
        mod = mod.transpose(0, 1)  # [s, b, 3h]
        return mod[seq_slice] if seq_slice is not None else mod

    def for_layer(self, shared_tokens: torch.Tensor, layer_index: int) -> Modulation:
        """Shared ``[s, b, 3h]`` + this layer's offset -> ``Modulation`` (``layer_index`` 0-based, global)."""
        mod = shared_tokens + self.layer_offsets[layer_index]
        shift, scale, gate = mod.chunk(3, dim=-1)
        return Modulation(shift, scale, gate)
