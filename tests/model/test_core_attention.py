"""SDPACoreAttention: the chunked block-diffusion path equals one dense-mask SDPA call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower.model import core_attention as ca
from twotower.model.core_attention import MaskSpec, SDPACoreAttention


def qkv(b, hq, hkv, sq, sk, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, sk, d, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, sk, d, generator=g, requires_grad=True)
    return q, k, v


def run(fn, q, k, v):
    """Output and grads of ``(out * w).sum()`` for a fixed random ``w``."""
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("L,S,b,hq,hkv", [
    (64, 8, 1, 2, 2),    # 8 equal chunks of one block each
    (64, 4, 2, 4, 2),    # GQA, chunks of two blocks
    (40, 4, 2, 2, 1),    # L not a multiple of the chunk length (8): last chunk shorter
    (96, 4, 1, 4, 4),    # chunks of three blocks
    (16, 16, 2, 4, 2),   # S == L: one block, no context keys visible anywhere
    (30, 4, 1, 2, 2),    # L % S != 0: partial last block
    (12, 1, 1, 2, 1),    # S == 1
])
def test_chunked_block_diffusion_equals_dense(L, S, b, hq, hkv):
    mask = MaskSpec.block_diffusion(S, L)
    q, k, v = qkv(b, hq, hkv, L, 2 * L)
    dense = mask.dense(L, 2 * L)

    def ref(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=hq != hkv)

    out, grads = run(lambda q, k, v: SDPACoreAttention()(q, k, v, mask), q, k, v)
    out_ref, grads_ref = run(ref, q, k, v)
    assert (out - out_ref).abs().max().item() <= 1e-5
    for g, g_ref, name in zip(grads, grads_ref, "qkv"):
        assert (g - g_ref).abs().max().item() <= 1e-5, name


def test_chunked_grads_when_only_own_keys_require_grad():
    """Context K/V without grad (e.g. a frozen context tower): own K/V grads still match."""
    L, S = 32, 4
    mask = MaskSpec.block_diffusion(S, L)
    q, k, v = qkv(2, 4, 2, L, 2 * L)
    k_ctx, k_own = k.detach()[:, :, :L], k.detach()[:, :, L:].requires_grad_()
    v_ctx, v_own = v.detach()[:, :, :L], v.detach()[:, :, L:].requires_grad_()
    outs = []
    for fn in (SDPACoreAttention(), lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, attn_mask=m.dense(L, 2 * L), enable_gqa=True)):
        out = fn(q, torch.cat([k_ctx, k_own], 2), torch.cat([v_ctx, v_own], 2), mask)
        outs.append((out.detach(), torch.autograd.grad(out.square().sum(), (q, k_own, v_own))))
    (o1, g1), (o2, g2) = outs
    assert (o1 - o2).abs().max().item() <= 1e-5
    for a, b in zip(g1, g2):
        assert (a - b).abs().max().item() <= 1e-5


def count_sdpa(monkeypatch):
    """Record the ``[sq, sk]`` of every SDPA call made by core_attention."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ca.F, "scaled_dot_product_attention", spy)
    return calls


def test_block_diffusion_is_chunked(monkeypatch):
    """Eight calls whose scored entries sum to well under the dense 2 L^2 (~0.69 L^2 here)."""
    L, S = 256, 16
    calls = count_sdpa(monkeypatch)
    q, k, v = qkv(1, 2, 2, L, 2 * L)
    SDPACoreAttention()(q, k, v, MaskSpec.block_diffusion(S, L))
    assert len(calls) == ca.BD_CHUNKS
    assert sum(sq for sq, _ in calls) == L
    work = sum(sq * sk for sq, sk in calls)
    assert work < 0.75 * L * L, work  # dense: 2 L^2
    calls.clear()
    SDPACoreAttention(n_chunks=2)(q, k, v, MaskSpec.block_diffusion(S, L))
    assert [sq for sq, _ in calls] == [128, 128]


@pytest.mark.parametrize("mask,sq,sk", [
    (MaskSpec.causal(), 24, 24),
    (MaskSpec.causal(offset=8), 16, 24),
    (MaskSpec.full(), 8, 24),
    (MaskSpec.block_diffusion(4, 8), 16, 24),  # context shorter than the queries: dense path
])
def test_other_masks_keep_one_dense_call(monkeypatch, mask, sq, sk):
    q, k, v = qkv(2, 4, 2, sq, sk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(sq, sk), enable_gqa=True)
    calls = count_sdpa(monkeypatch)
    out = SDPACoreAttention()(q, k, v, mask)
    assert calls == [(sq, sk)]
    assert (out - ref).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_compiled_flex_decoding_compiles_once_for_every_offset_and_length():
    """Decoding calls attention with a new key length and causal offset every block: FlexAttention
    is compiled once with dynamic shapes (the offset is a tensor inside the mask), equal to SDPA."""
    import torch._dynamo.utils as dynamo_utils

    from twotower.model.core_attention import FlexCoreAttention, SDPACoreAttention

    torch._dynamo.reset()
    flex, ref = FlexCoreAttention(compile=True), SDPACoreAttention()
    graphs = []
    for sk in (20, 36, 52):
        q, k, v = torch.randn(1, 4, 16, 16), torch.randn(1, 2, sk, 16), torch.randn(1, 2, sk, 16)
        for mask in (MaskSpec.causal(offset=sk - 16), MaskSpec.full()):
            torch.testing.assert_close(flex(q, k, v, mask), ref(q, k, v, mask), atol=1e-5, rtol=1e-5)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[0] == graphs[-1], graphs  # no recompilation after the first block
