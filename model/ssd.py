"""Mamba-2 state-space duality (SSD) scan: chunked, fully vectorised, with block-boundary states.

Maths (Mamba-2 / SSD, Dao & Gu 2024, "Transformers are SSMs"). Per head ``h`` with scalar decay
``A_h < 0`` and group ``g(h) = h // (H / G)`` for ``B`` and ``C``::

    dt'_t    = clamp(softplus(dt_t + dt_bias), *dt_limit)          (softplus optional)
    a_t      = dt'_t * A                                            (log-decay, <= 0)
    S_t      = exp(a_t) S_{t-1} + dt'_t x_t B_t^T                   S_t: (p, n)
    y_t      = S_t C_t + D x_t

Unrolled, ``y = M (dt' x)`` with the semiseparable matrix ``M_ij = C_i.B_j exp(sum_{j<k<=i} a_k)``
(i >= j). SSD evaluates it chunk by chunk (chunk length ``q``):

1. intra-chunk ("diagonal blocks"): ``Y_diag = (C B^T * L) (dt' x)`` with ``L = exp(segsum(a))``,
   a masked q x q attention-like product;
2. chunk-local end states ``U_c = sum_j exp(a_cum[end] - a_cum[j]) dt'_j x_j B_j^T``;
3. inter-chunk recurrence ``S_c = exp(sum a over chunk c) S_{c-1} + U_c`` -- a scalar-decay linear
   recurrence over chunks, evaluated here *hierarchically* (blocks of chunks, segsum inside a
   block, recursion over blocks), so long sequences with small chunks stay O(N) instead of the
   O(N^2) of a single ``segsum`` over all chunks;
4. state -> output ("off-diagonal blocks"): ``Y_off_i = exp(a_cum_i) C_i S_{c-1}``.

The states ``S_c`` of step 3 are exactly the states at chunk boundaries, so ``state_every=S``
is served by the chunking (see ``_plan``): for ``S >= chunk_size`` the chunk length divides ``S``
and the boundary states are a strided slice of the inter-chunk recurrence; for ``S < chunk_size``
the chunk length is a multiple of ``S`` and the same recurrence is run one level down (sub-block
local states, seeded with each chunk's start state, all chunks batched). No Python loop over time
or chunks anywhere; everything is plain autograd.

Backends (``backend`` = ``parallel.ssm_backend``, resolved per call by ``kernels.select``): ``torch``
(always) and ``mamba_ssm`` (Triton ``mamba_chunk_scan_combined``; CUDA only).
The fused kernel only exposes the final state, so with that backend the boundary states come from
the torch steps 2-3 at block granularity (O(l p n) per head, fp32, differentiable).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from twotower.model import kernels

# Inter-chunk recurrences over more than this many chunks are split into blocks of this many
# (segsum inside a block costs O(T^2) per state element; the recursion keeps total work O(N T)).
_SCAN_BLOCK = 64


class SSDOutput(NamedTuple):
    y: Tensor  # (b, l, h, p), dtype of x
    final_state: Tensor | None  # (b, h, p, n) fp32, state after the last token
    boundary_states: Tensor | None  # (b, l // S, h, p, n) fp32, entry k = state after [0, (k+1) S)


# ----------------------------------------------------------------------------- shared helpers


def _discretize(x: Tensor, dt: Tensor, A: Tensor, dt_bias: Tensor | None, dt_softplus: bool,
                dt_limit: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """``(dt' x, dt' A)`` in the accumulation dtype: (b, l, h, p) and (b, l, h)."""
    acc = _acc_dtype(x)
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return x.to(acc) * dt[..., None], dt * A.to(acc)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """fp32 for everything (precision matters before the cumsums); fp64 stays fp64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segsum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): ``out[i, j] = sum_{j<k<=i} a_k`` for i >= j, else -inf.

    Summing the masked entries directly (rather than ``cumsum[i] - cumsum[j]``) avoids
    cancellation when the cumulative sums are large (the HF / minimal-SSD "stable" segsum).
    """
    T = a.size(-1)
    x = a[..., None].expand(*a.shape, T)  # x[..., k, j] = a_k
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return x.masked_fill(~causal, -torch.inf)


def _state_scan(a: Tensor, u: Tensor, init: Tensor | None) -> Tensor:
    """All states of ``S_i = exp(a_i) S_{i-1} + u_i`` with ``S_{-1} = init`` (zeros if None).

    a: (b, N, h) log-decays; u: (b, N, h, p, n); init: (b, h, p, n). Returns (b, N, h, p, n).
    Direct segsum for short N; otherwise blocks of ``_SCAN_BLOCK`` with a recursive scan over the
    block totals (depth log_T N, no per-step Python loop).
    """
    b, N, h = a.shape
    if N <= _SCAN_BLOCK:
        decay = torch.exp(_segsum(a.transpose(1, 2)))  # (b, h, N, N)
        out = torch.einsum("bhij,bjhpn->bihpn", decay, u)
        if init is not None:  # addcmul: one pass over the (large) state tensor instead of two
            out = torch.addcmul(out, torch.exp(a.cumsum(1))[..., None, None], init[:, None])
        return out
    T = _SCAN_BLOCK
    pad = (-N) % T  # trailing zero log-decay / zero input: padded steps leave the state unchanged
    a_blk = F.pad(a, (0, 0, 0, pad)).view(b, -1, T, h)  # (b, k, T, h)
    u_blk = F.pad(u, (0, 0, 0, 0, 0, 0, 0, pad)).view(b, -1, T, *u.shape[2:])  # (b, k, T, h, p, n)
    decay = torch.exp(_segsum(a_blk.permute(0, 1, 3, 2)))  # (b, k, h, T, T)
    local = torch.einsum("bkhij,bkjhpn->bkihpn", decay, u_blk)  # zero-init states within a block
    ends = _state_scan(a_blk.sum(2), local[:, :, -1], init)  # (b, k, h, p, n): block end states
    first = init[:, None] if init is not None else torch.zeros_like(ends[:, :1])
    starts = torch.cat([first, ends[:, :-1]], dim=1)  # state entering each block
    out = torch.addcmul(local, torch.exp(a_blk.cumsum(2))[..., None, None], starts[:, :, None])
    return out.reshape(b, -1, *u.shape[2:])[:, :N]


def _local_states(xdt: Tensor, a: Tensor, B: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """Zero-init end state of every length-``q`` block and the per-block total log-decay.

    xdt: (b, L, h, p), a: (b, L, h), B: (b, L, g, n), L % q == 0.
    Returns U (b, L/q, h, p, n) and a_tot (b, L/q, h).
    """
    b, L, h, p = xdt.shape
    g, n = B.shape[2:]
    a_cum = a.view(b, L // q, q, h).cumsum(2)  # (b, c, q, h)
    w = torch.exp(a_cum[:, :, -1:] - a_cum)  # decay from each position to the block end
    xw = (xdt.view(b, L // q, q, h, p) * w[..., None]).view(b, L // q, q, g, h // g, p)
    U = torch.einsum("bcjgn,bcjgrp->bcgrpn", B.view(b, L // q, q, g, n), xw)
    return U.reshape(b, L // q, h, p, n), a_cum[:, :, -1]


# ----------------------------------------------------------------------------- torch backend


def _chunk_scan(xdt: Tensor, a: Tensor, B: Tensor, C: Tensor, q: int,
                init: Tensor | None, need_ends: bool = True) -> tuple[Tensor, Tensor | None]:
    """SSD steps 1-4 on fp32 inputs with L % q == 0. Returns y (b, L, h, p) without the D term
    and the chunk end states (b, L/q, h, p, n); with ``need_ends=False`` and a single chunk (the
    denoiser's block-wise scan) no state is formed at all: the output only needs ``init``."""
    b, L, h, p = xdt.shape
    g, n = B.shape[2:]
    r, c = h // g, L // q
    # Heads stay split as (g, r) so C B^T is formed once per group, not once per head.
    xg = xdt.view(b, c, q, g, r, p)
    Bc, Cc = B.view(b, c, q, g, n), C.view(b, c, q, g, n)
    ac = a.view(b, c, q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    a_cum = ac.cumsum(-1)

    # 1. intra-chunk: masked (C B^T) * decay applied to dt' x.
    G = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, q, q)
    M = G[:, :, :, None] * torch.exp(_segsum(ac))  # (b, c, g, r, q, q)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", M, xg)

    if c == 1 and not need_ends:
        if init is None:
            return y.reshape(b, L, h, p), None
        starts = init.view(b, 1, g, r, p, n)
        ends = None
    else:
        # 2-3. chunk-local states, then the inter-chunk recurrence (states at chunk ends).
        U, a_tot = _local_states(xdt, a, B, q)
        ends = _state_scan(a_tot, U, init)  # (b, c, h, p, n)
        # 4. contribution of the state entering each chunk.
        first = init[:, None] if init is not None else torch.zeros_like(ends[:, :1])
        starts = torch.cat([first, ends[:, :-1]], dim=1).view(b, c, g, r, p, n)
    y_off = torch.einsum("bcign,bcgrpn->bcigrp", Cc, starts)
    y = y + y_off * torch.exp(a_cum).permute(0, 1, 4, 2, 3)[..., None]
    return y.reshape(b, L, h, p), ends


def _plan(chunk_size: int, S: int | None) -> tuple[int, str]:
    """Chunk length ``q`` for the torch path and how the boundary states are obtained.

    * ``"ends"``: ``S`` is a multiple of ``q`` (``q`` = largest divisor of S <= chunk_size), so the
      boundary states are a strided slice of the inter-chunk recurrence;
    * ``"sub"`` (S < chunk_size): ``q`` = largest multiple of S <= chunk_size; the chunk-level
      recurrence gives each chunk's start state and a short scan over the q/S sub-blocks inside
      each chunk (all chunks batched) gives the boundaries. Using q = S directly would be correct
      too but materialises a (p, n) state per S tokens in *every* step of the output path, which
      measured ~3x slower on CPU;
    * ``"separate"``: a pathological S (e.g. prime > chunk) would force tiny chunks; keep the
      requested chunking and run a separate O(l p n) block-state pass.
    """
    if S is None:
        return chunk_size, "none"
    if S < chunk_size:
        q = S * (chunk_size // S)
        return q, ("ends" if q == S else "sub")
    q = max(d for d in range(1, chunk_size + 1) if S % d == 0)
    return (q, "ends") if 4 * q >= chunk_size else (chunk_size, "separate")


def _block_states(xdt: Tensor, a: Tensor, B: Tensor, S: int, init: Tensor | None) -> Tensor:
    """States after every ``S`` tokens, (b, l/S, h, p, n), without computing outputs."""
    U, a_tot = _local_states(xdt, a, B.to(xdt.dtype), S)
    return _state_scan(a_tot, U, init)


def _sub_block_states(xdt: Tensor, a: Tensor, B: Tensor, S: int, q: int, ends: Tensor,
                      init: Tensor | None) -> Tensor:
    """States after every ``S`` tokens given the chunk end states ``ends`` (b, L/q, h, p, n)."""
    b, L, h, p = xdt.shape
    n = B.shape[-1]
    U, a_tot = _local_states(xdt, a, B, S)  # (b, L/S, h, p, n), (b, L/S, h)
    first = init[:, None] if init is not None else torch.zeros_like(ends[:, :1])
    starts = torch.cat([first, ends[:, :-1]], dim=1).reshape(-1, h, p, n)  # (b c, h, p, n)
    m = q // S  # sub-blocks per chunk; chunks fold into the batch dimension
    out = _state_scan(a_tot.reshape(-1, m, h), U.reshape(-1, m, h, p, n), starts)
    return out.reshape(b, L // S, h, p, n)


def _ssd_torch(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, init, state_every,
               return_final_state):
    l, h = x.shape[1], x.shape[2]
    xdt, a = _discretize(x, dt, A, dt_bias, dt_softplus, dt_limit)
    acc = xdt.dtype
    init = init.to(acc) if init is not None else None
    q, mode = _plan(chunk_size, state_every)
    if mode == "none" and l < q:
        q = l  # one short chunk (e.g. a denoiser block): padding to chunk_size would waste work
    pad = (-l) % q  # zero dt'x and zero log-decay: padded steps change neither y nor the state
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
    Bf = F.pad(B.to(acc), (0, 0, 0, 0, 0, pad))
    Cf = F.pad(C.to(acc), (0, 0, 0, 0, 0, pad))
    y, ends = _chunk_scan(xdt, a, Bf, Cf, q, init, need_ends=mode != "none" or return_final_state)
    y = y[:, :l]
    if D is not None:
        y = y + x.to(acc) * D.to(acc).view(h, -1)  # D: (h,) or (h, p)
    boundary = None
    if mode == "ends":
        boundary = ends[:, state_every // q - 1 :: state_every // q]
    elif mode == "sub":
        boundary = _sub_block_states(xdt, a, Bf, state_every, q, ends, init)[:, : l // state_every]
    elif mode == "separate":
        boundary = _block_states(xdt[:, :l], a[:, :l], B, state_every, init)
    final = ends[:, -1] if return_final_state else None
    return SSDOutput(y.to(x.dtype), final, boundary)


# ----------------------------------------------------------------------------- mamba_ssm backend


def _ssd_mamba_ssm(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, init, state_every,
                   return_final_state):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # The fused autograd Function is differentiable w.r.t. every input incl. initial_states and
    # the returned final state. It needs unit stride on the last dim and fp32 A / states.
    out = mamba_chunk_scan_combined(
        x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
        D=D, dt_bias=dt_bias, initial_states=init.float().contiguous() if init is not None else None,
        dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_state,
    )
    y, final = out if return_final_state else (out, None)
    boundary = None
    if state_every is not None:
        # The kernel's own per-chunk states are internal, non-differentiable and in C's dtype;
        # recompute the (cheap, no q^2 term) boundary states in fp32 torch instead.
        xdt, a = _discretize(x, dt, A, dt_bias, dt_softplus, dt_limit)
        boundary = _block_states(xdt, a, B, state_every, init.float() if init is not None else None)
    return SSDOutput(y, final.float() if final is not None else None, boundary)


# ----------------------------------------------------------------------------- public API


def ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int,
                   D: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
                   dt_limit: tuple[float, float] = (0.0, float("inf")),
                   initial_states: Tensor | None = None, state_every: int | None = None,
                   return_final_state: bool = False, backend: str = "auto") -> SSDOutput:
    """Mamba-2 SSD scan over a whole sequence (see module docstring for the maths).

    x (b, l, h, p); dt (b, l, h) raw; A (h,) negative; B, C (b, l, g, n), h % g == 0;
    D (h,) or (h, p); dt_bias (h,); initial_states (b, h, p, n) fp32 (zeros if None).
    ``state_every=S`` (l % S == 0) returns ``boundary_states`` (b, l/S, h, p, n): entry k is the
    state after tokens [0, (k+1) S), i.e. the state block k+1 starts from; the last one is the
    final state. Computation in fp32 (fp64 for fp64 inputs), ``y`` in ``x.dtype``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"number of heads {h} is not a multiple of the number of groups {g}")
    if dt.shape != (b, l, h) or B.shape != (b, l, g, n) or C.shape != B.shape or A.shape != (h,):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)},"
                         f" B {tuple(B.shape)}, C {tuple(C.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must be {(b, h, p, n)}, got {tuple(initial_states.shape)}")
    if state_every is not None and (state_every <= 0 or l % state_every):
        raise ValueError(f"sequence length {l} must be a positive multiple of state_every={state_every}")
    impl = _ssd_mamba_ssm if kernels.select("ssd", backend, x) == "kernel" else _ssd_torch
    return impl(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_states,
                state_every, return_final_state)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
             dt_limit: tuple[float, float] = (0.0, float("inf"))) -> tuple[Tensor, Tensor]:
    """One decoding step of the recurrence. state (b, h, p, n); x (b, h, p); dt (b, h);
    B, C (b, g, n). Returns (y (b, h, p) in x.dtype, new_state (b, h, p, n) fp32); no in-place."""
    h, g = x.shape[1], B.shape[1]
    xdt, a = _discretize(x[:, None], dt[:, None], A, dt_bias, dt_softplus, dt_limit)
    xdt, a = xdt[:, 0], a[:, 0]  # (b, h, p), (b, h)
    acc = xdt.dtype
    Bh = B.to(acc).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(acc).repeat_interleave(h // g, dim=1)
    new_state = torch.exp(a)[..., None, None] * state.to(acc) + xdt[..., None] * Bh[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + x.to(acc) * D.to(acc).view(h, -1)
    return y.to(x.dtype), new_state
