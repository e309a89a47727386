"""Depthwise causal 1-D convolution of the Mamba-2 mixer, with the conv states a scan resumes from.

Maths (Mamba-2, Dao & Gu 2024; the short conv before the SSM): per channel ``d`` with kernel
width ``k``::

    y_t = act( sum_{i=0}^{k-1} w_{d,i} u_{t-k+1+i} + bias_d ),   u_{-k+1..-1} = initial_state

The *conv state* after position ``t`` is the last ``k-1`` inputs ``u_{t-k+2..t}`` (pre-conv,
pre-activation): it is all a later segment needs, so a sequence split into blocks and scanned
block by block, each primed with the previous block's state, equals one scan. ``state_every=S``
returns that state at every block end ``(j+1) S - 1`` as strided windows of the padded input
(a view, so differentiable and free).

Backends (``backend`` = ``parallel.ssm_backend``, resolved per call by ``kernels.select``): ``torch``
(``F.conv1d`` with ``groups=d`` on the input left-padded by the initial state) and ``mamba_ssm``
(the kernel family: Dao-AILab's causal-conv1d CUDA kernel, widths 2..4, CUDA tensors, stride rules in
``kernels.conv_limits``; ``auto`` falls back to torch where it cannot take the call). States are
always sliced in torch: they are plain copies of inputs, so the kernel's own final-state output
(with its extra layout constraints) is not needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from twotower.model import kernels
from twotower.model.kernels import conv_limits

_ACTIVATIONS: dict[str | None, Callable[[Tensor], Tensor]] = {
    None: lambda t: t, "silu": F.silu, "swish": F.silu,
}


class ConvOutput(NamedTuple):
    y: Tensor  # (b, d, l), dtype of x
    final_state: Tensor | None  # (b, d, k-1): last k-1 inputs (incl. initial_state when l < k-1)
    boundary_states: Tensor | None  # (b, l // S, d, k-1): entry j = last k-1 inputs up to (j+1) S - 1


def _padded_input(x: Tensor, k: int, initial_state: Tensor | None) -> Tensor:
    """(b, d, k-1+l): the inputs preceded by the k-1 inputs before them (zeros if no state)."""
    if initial_state is None:
        return F.pad(x, (k - 1, 0))
    return torch.cat([initial_state.to(x.dtype), x], dim=-1)


def _conv_torch(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                initial_state: Tensor | None) -> Tensor:
    # Compute in the wider of (input, weight) dtypes, like HF's NemotronH path and the CUDA kernel
    # (which accumulates in fp32), then return the input dtype.
    cdt = torch.promote_types(x.dtype, weight.dtype)
    xp = _padded_input(x, weight.shape[1], initial_state).to(cdt)
    y = F.conv1d(xp, weight.unsqueeze(1).to(cdt), bias.to(cdt) if bias is not None else None,
                 groups=x.shape[1])
    return _ACTIVATIONS[activation](y).to(x.dtype)


def _conv_cuda(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
               initial_state: Tensor | None) -> Tensor:
    from causal_conv1d import causal_conv1d_fn

    if initial_state is not None:
        # The kernel accepts initial_states only in channel-last layout (x.stride(1) == 1 and
        # initial_states.stride(1) == 1): materialise (b, l, d) memory, view it as (b, d, l).
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        initial_state = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    # The kernel takes weights in their own dtype and accumulates in fp32 (same as the torch path).
    bias = bias.to(weight.dtype) if bias is not None else None
    return causal_conv1d_fn(x, weight, bias, initial_states=initial_state, activation=activation)


def _kernel_strides(x: Tensor, initial_state: Tensor | None) -> tuple[int, ...]:
    """Strides of the tensor :func:`_conv_cuda` hands the kernel (channel-last copy with states)."""
    _, d, l = x.shape
    return (l * d, 1, d) if initial_state is not None else tuple(x.stride())


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  activation: str | None = "silu", initial_state: Tensor | None = None,
                  state_every: int | None = None, return_final_state: bool = False,
                  backend: str = "auto") -> ConvOutput:
    """Depthwise causal conv. x (b, d, l); weight (d, k); bias (d,); initial_state (b, d, k-1).

    ``state_every=S`` (l % S == 0) also returns the conv state at every block end, shape
    (b, l/S, d, k-1), entry j = the inputs at positions (j+1) S - k + 1 .. (j+1) S - 1, i.e. what
    block j+1 must be primed with. States are in ``x.dtype``.
    """
    b, d, l = x.shape
    k = weight.shape[1]
    if weight.shape != (d, k):
        raise ValueError(f"weight must be (d={d}, k), got {tuple(weight.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, k - 1):
        raise ValueError(f"initial_state must be {(b, d, k - 1)}, got {tuple(initial_state.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    if state_every is not None and (state_every <= 0 or l % state_every):
        raise ValueError(f"sequence length {l} must be a positive multiple of state_every={state_every}")
    limits = conv_limits(tuple(x.shape), _kernel_strides(x, initial_state), k, activation)
    impl = _conv_cuda if kernels.select("conv", backend, x, limits) == "kernel" else _conv_torch
    y = impl(x, weight, bias, activation, initial_state)

    final = boundary = None
    if return_final_state or state_every is not None:
        xp = _padded_input(x, k, initial_state)  # input position t sits at index t + k - 1
        if return_final_state:
            final = xp[..., xp.shape[-1] - (k - 1):]
        if state_every is not None:
            # Window j covers indices [(j+1) S, (j+1) S + k - 1) = positions up to (j+1) S - 1.
            S = state_every
            if k == 1:  # no state at all; unfold rejects size 0
                boundary = x.new_zeros(b, l // S, d, 0)
            else:
                boundary = xp[..., S:].unfold(-1, k - 1, S).permute(0, 2, 1, 3)  # (b, l/S, d, k-1)
    return ConvOutput(y, final, boundary)


def causal_conv1d_step(state: Tensor, x_t: Tensor, weight: Tensor, bias: Tensor | None = None,
                       activation: str | None = "silu") -> tuple[Tensor, Tensor]:
    """One decoding step. state (b, d, k-1); x_t (b, d). Returns (y_t (b, d), new_state (b, d, k-1));
    the state is not modified in place."""
    window = torch.cat([state.to(x_t.dtype), x_t[..., None]], dim=-1)  # (b, d, k)
    cdt = torch.promote_types(x_t.dtype, weight.dtype)
    y = (window.to(cdt) * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    return _ACTIVATIONS[activation](y).to(x_t.dtype), window[..., 1:]
