"""adaLN-single time conditioning of the denoiser, exactly as NVIDIA released it.

Stage: denoiser tower, once per forward. Input: the diffusion time ``t: [b, n_t]`` in
[0, 1] (``n_t`` = 1: one time per sequence, the release's recipe and its decoders; ``n_t`` =
blocks per sequence: one time per block). Output: per layer ``Modulation(shift, scale, gate)``,
each ``[1 or blocks, b, h]`` (broadcast over the tokens, never materialised per token). Parameter
names are the release's (spec release.md §3, §6)::

    s   = bf16(bf16(t) * 1000)                        the release's precision chain (§6.1)
    e   = t_embedder(s)  = W2 silu(W1 [cos(s f) ; sin(s f)] + b1) + b2        f_j = 10000^(-j/128)
    m   = t_block(e)     = W3 silu(e) + b3            [b, 3h] = rows (shift, scale, gate)
    (shift, scale, gate)_i = m + scale_shift_tables[i]                            [3, h] per layer

and layer ``i`` (``twotower.model.layers.HybridLayer``) applies, with
``modulate(u) = u (1 + scale) + shift`` and the gate as is (not ``1 + gate``)::

    M, *:  x <- x + gate * mixer(rmsnorm(modulate(x)))      modulate the residual stream BEFORE the norm
    E, -:  x <- x + gate * mixer(modulate(rmsnorm(x)))      modulate AFTER the norm

Inits (``TwoTowerConfig.adaln_init``): ``identity`` (t_block zero, table rows shift 0, scale 0,
gate 1: a fresh denoiser computes exactly the backbone's function) and ``release`` (the public
code's: PyTorch's default Linear init everywhere, tables ~ N(0, 1)/sqrt(h)). Both draw from a
private generator seeded by the layer index, so every parallel layout gets the same weights.

Gradients: every tensor-parallel rank holds the whole time network; under sequence parallelism
each rank sees the gradient of its sequence shard only, so all parameters carry
``.sequence_parallel`` (megatron's ``finalize_model_grads`` all-reduces them over TP, as for the
norms). Every pipeline stage holds ``t_embedder`` and ``t_block`` but only its own layers'
tables: the shared network carries ``.pipeline_parallel`` and the TransformerConfig sets
``has_cond_embedder``, megatron's path for diffusion models' replicated conditional embedders.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Width of the sinusoidal time features (the release's ``frequency_embedding_size``).
FREQ_DIM = 256
#: ``1000 t`` is embedded (DiT convention); the sinusoid's own max period is 10000.
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0
ADALN_INITS = ("identity", "release")


class Modulation:
    """``(shift, scale, gate)`` for one layer, each ``[n, b, h]``: ``n`` = 1 (one time per sequence),
    the blocks of this rank's tokens (one time per block), or this rank's tokens."""

    __slots__ = ("gate", "scale", "shift")

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor):
        self.shift, self.scale, self.gate = shift, scale, gate

    def modulate(self, u: torch.Tensor) -> torch.Tensor:
        """``u (1 + scale) + shift`` for ``u: [s, b, h]``, in ``u``'s dtype."""
        v, e = self._blocks(u)
        return (v * (1 + e(self.scale)) + e(self.shift)).to(u.dtype).reshape(u.shape)

    def apply_gate(self, out: torch.Tensor) -> torch.Tensor:
        """``gate * out`` for ``out: [s, b, h]`` (the gate as released, not ``1 + gate``)."""
        v, e = self._blocks(out)
        return (e(self.gate) * v).reshape(out.shape)

    def _blocks(self, u: torch.Tensor):
        """Per-block vectors act on ``u`` viewed as ``[n, s/n, b, h]``: a block's vector is broadcast
        over its tokens, never copied to each of them (``[s, b, 3h]`` per layer would be 3x the
        residual stream at 30B scale)."""
        n = self.shift.shape[0]
        if n in (1, u.shape[0]):
            return u, lambda m: m
        return u.unflatten(0, (n, u.shape[0] // n)), lambda m: m[:, None]


def timestep_embedding(t: torch.Tensor, dtype: torch.dtype, dim: int = FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features of ``1000 t`` with the release's precision chain: ``[...] -> [..., dim]``.

    ``t`` is cast to ``dtype`` first and multiplied by 1000 in that dtype (in bf16 a 16-token
    block with k masked tokens feeds 1000, 936, 876, ... not 1000 k / 16); the arguments are
    fp32 and the features are cast back to ``dtype``. Layout ``[cos ; sin]``.
    """
    s = t.to(dtype) * TIME_SCALE
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = s.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)


class TimestepEmbedder(nn.Module):
    """``t_embedder``: sinusoid(1000 t) -> Linear(256, h) -> SiLU -> Linear(h, h) (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_DIM, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.freq_dim = freq_dim
        f = {"device": device, "dtype": dtype}
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size, **f), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, **f))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t [...]`` -> ``[..., h]`` in the weights' dtype."""
        return self.mlp(timestep_embedding(t, self.mlp[0].weight.dtype, self.freq_dim))


def build_time_conditioning(hidden_size: int, layer_indices: list[int], init: str = "identity",
                            seed: int = 0, device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None, sequence_parallel: bool = False,
                            pipeline_parallel: bool = False,
                            ) -> tuple[TimestepEmbedder, nn.Sequential, nn.ParameterDict]:
    """``(t_embedder, t_block, scale_shift_tables)`` for the layers ``layer_indices`` (global,
    0-based; the tables are keyed ``str(i)``, the release's ``scale_shift_tables.{i}``)."""
    if init not in ADALN_INITS:
        raise ValueError(f"twotower.adaln_init={init!r}: use one of {', '.join(ADALN_INITS)}")
    h = hidden_size
    f = {"device": device, "dtype": dtype}
    t_embedder = TimestepEmbedder(h, **f)
    t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 3 * h, **f))
    tables = nn.ParameterDict({str(i): nn.Parameter(torch.empty(3, h, **f)) for i in layer_indices})
    reset_time_conditioning(t_embedder, t_block, tables, init, seed)
    for p in t_embedder.parameters():
        p.pipeline_parallel = pipeline_parallel  # read by megatron's finalize_model_grads (has_cond_embedder)
    for p in t_block.parameters():
        p.pipeline_parallel = pipeline_parallel
    for module in (t_embedder, t_block, tables):
        for p in module.parameters():
            p.sequence_parallel = sequence_parallel  # read by megatron's finalize_model_grads
    return t_embedder, t_block, tables


@torch.no_grad()
def reset_time_conditioning(t_embedder: TimestepEmbedder, t_block: nn.Sequential, tables: nn.ParameterDict,
                            init: str = "identity", seed: int = 0) -> None:
    """(Re-)initialise in place; layout-independent (private generators, tables seeded by layer)."""
    g = torch.Generator().manual_seed(seed)
    for lin in (t_embedder.mlp[0], t_embedder.mlp[2], t_block[1]):
        _torch_default_linear_init(lin, g)
    h = t_block[1].in_features
    if init == "identity":
        t_block[1].weight.zero_()
        t_block[1].bias.zero_()
    for key, table in tables.items():
        if init == "identity":
            table.copy_(torch.tensor([0.0, 0.0, 1.0], device="cpu")[:, None].expand(3, h))
        else:
            gi = torch.Generator().manual_seed(seed * 1_000_003 + int(key) + 1)
            table.copy_(torch.randn(3, h, generator=gi, device="cpu") / math.sqrt(h))


def _torch_default_linear_init(lin: nn.Linear, g: torch.Generator) -> None:
    """``nn.Linear.reset_parameters`` (kaiming-uniform a=sqrt(5): U(+-1/sqrt(fan_in))) from ``g``."""
    bound = 1 / math.sqrt(lin.in_features)
    # drawn on the CPU from the private generator (the same numbers on every device), then copied
    lin.weight.copy_(torch.empty(lin.weight.shape, device="cpu").uniform_(-bound, bound, generator=g))
    lin.bias.copy_(torch.empty(lin.bias.shape, device="cpu").uniform_(-bound, bound, generator=g))


def shared_modulation(t_embedder: TimestepEmbedder, t_block: nn.Sequential, t: torch.Tensor, tokens: int,
                      seq_slice: slice | None = None) -> torch.Tensor:
    """``t [b, n_t]`` -> the shared modulation ``[n, b, 3, h]`` (before the per-layer tables).

    ``n_t == 1`` (one time per sequence): ``n = 1``. One time per block: ``n`` = the blocks of this
    rank's tokens (``seq_slice``: its sequence shard under sequence parallelism), one vector per
    block, broadcast over the block's tokens by :class:`Modulation`; only a shard that does not hold
    whole blocks gets one vector per token.
    """
    b, n_t = t.shape
    m = t_block(t_embedder(t))  # [b, n_t, 3h]
    m = m.view(b, n_t, 3, -1).transpose(0, 1)  # [n_t, b, 3, h]
    if n_t == 1 or seq_slice is None:
        return m
    per = tokens // n_t
    if seq_slice.start % per == 0 and seq_slice.stop % per == 0:
        return m[seq_slice.start // per: seq_slice.stop // per]
    return m.repeat_interleave(per, dim=0)[seq_slice]  # [s/tp, b, 3, h]


def layer_modulation(shared: torch.Tensor, table: torch.Tensor) -> Modulation:
    """Shared ``[n, b, 3, h]`` + this layer's table ``[3, h]`` -> ``Modulation`` (``[n, b, h]`` each)."""
    shift, scale, gate = (shared + table).unbind(dim=2)
    return Modulation(shift, scale, gate)
