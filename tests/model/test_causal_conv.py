"""Tests for model/causal_conv.py against a naive per-position loop written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower.model.causal_conv import causal_conv1d, causal_conv1d_step


def naive_conv(x, w, bias=None, activation="silu", init=None):
    """y_t = act(sum_i w_i u_{t-k+1+i} + bias) with u_{<0} taken from init (zeros if None)."""
    b, d, l = x.shape
    k = w.shape[1]
    hist = init.clone() if init is not None else x.new_zeros(b, d, k - 1)
    u = torch.cat([hist, x], -1)
    ys = []
    for t in range(l):
        acc = sum(w[:, i] * u[:, :, t + i] for i in range(k))
        if bias is not None:
            acc = acc + bias
        ys.append(acc)
    y = torch.stack(ys, -1)
    return F.silu(y) if activation == "silu" else y


def make(b=2, d=6, l=20, k=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return r(b, d, l), r(d, k), r(d), r(b, d, k - 1)


@pytest.mark.parametrize("k,use_bias,use_init,act", [(4, True, True, "silu"), (4, False, False, None),
                                                     (2, True, False, "silu"), (3, False, True, None)])
def test_matches_naive(k, use_bias, use_init, act):
    x, w, bias, init = make(k=k)
    bias, init = (bias if use_bias else None), (init if use_init else None)
    out = causal_conv1d(x, w, bias, activation=act, initial_state=init, return_final_state=True, backend="torch")
    torch.testing.assert_close(out.y, naive_conv(x, w, bias, act, init), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.final_state, x[..., -(k - 1):])
    assert out.boundary_states is None


def test_final_state_short_sequence_includes_initial_state():
    x, w, bias, init = make(l=2, k=4)
    out = causal_conv1d(x, w, bias, initial_state=init, return_final_state=True, backend="torch")
    torch.testing.assert_close(out.final_state, torch.cat([init[..., -1:], x], -1))
    out0 = causal_conv1d(x, w, bias, return_final_state=True, backend="torch")
    torch.testing.assert_close(out0.final_state, F.pad(x, (1, 0)))


@pytest.mark.parametrize("S", [1, 2, 5, 10])
def test_boundary_states(S):
    x, w, bias, init = make(l=20, k=4)
    out = causal_conv1d(x, w, bias, initial_state=init, state_every=S, return_final_state=True, backend="torch")
    u = torch.cat([init, x], -1)  # position t at index t + 3
    expect = torch.stack([u[..., (j + 1) * S:(j + 1) * S + 3] for j in range(20 // S)], 1)
    assert out.boundary_states.shape == (2, 20 // S, 6, 3)
    torch.testing.assert_close(out.boundary_states, expect)
    torch.testing.assert_close(out.boundary_states[:, -1], out.final_state)
    with pytest.raises(ValueError, match="multiple of state_every"):
        causal_conv1d(x, w, state_every=3)


@pytest.mark.parametrize("S", [2, 5])
def test_blockwise_seeded_equals_full(S):
    x, w, bias, init = make(l=20, k=4)
    full = causal_conv1d(x, w, bias, initial_state=init, state_every=S, backend="torch")
    seeds = torch.cat([init[:, None], full.boundary_states[:, :-1]], 1)
    for j in range(20 // S):
        blk = causal_conv1d(x[..., j * S:(j + 1) * S], w, bias, initial_state=seeds[:, j], backend="torch")
        torch.testing.assert_close(blk.y, full.y[..., j * S:(j + 1) * S], atol=1e-6, rtol=1e-6)


def test_step_iterated_equals_full():
    x, w, bias, init = make(l=9, k=4)
    full = causal_conv1d(x, w, bias, initial_state=init, return_final_state=True, backend="torch")
    state, ys = init, []
    for t in range(9):
        y, state = causal_conv1d_step(state, x[..., t], w, bias, "silu")
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, -1), full.y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, full.final_state)


def test_gradcheck():
    x, w, bias, init = (t.requires_grad_() for t in make(b=1, d=2, l=6, k=3, dtype=torch.float64))

    def f(x, w, bias, init):
        out = causal_conv1d(x, w, bias, initial_state=init, state_every=3, return_final_state=True, backend="torch")
        return out.y, out.final_state, out.boundary_states

    assert torch.autograd.gradcheck(f, (x, w, bias, init))


@pytest.mark.gpu
@pytest.mark.parametrize("use_init", [False, True])
def test_causal_conv1d_backend_matches_torch(use_init):
    pytest.importorskip("causal_conv1d")
    x, w, bias, init = (t.cuda() for t in make(b=2, d=64, l=256, k=4))
    res = {}
    for backend in ("torch", "mamba_ssm"):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias, init)]
        out = causal_conv1d(*leaves[:3], initial_state=leaves[3] if use_init else None, state_every=64,
                            return_final_state=True, backend=backend)
        (out.y.square().sum() + out.boundary_states.sum()).backward()
        res[backend] = (out, [t.grad for t in leaves])
    (o_t, g_t), (o_c, g_c) = res["torch"], res["mamba_ssm"]
    torch.testing.assert_close(o_c.y, o_t.y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o_c.boundary_states, o_t.boundary_states)
    for a, b in zip(g_c[: 4 if use_init else 3], g_t):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_low_precision_input_computes_in_weight_dtype():
    x, w, bias, init = make(l=12)
    out = causal_conv1d(x.bfloat16(), w, bias, initial_state=init.bfloat16(), return_final_state=True,
                        backend="torch")
    ref = naive_conv(x.bfloat16().float(), w, bias, "silu", init.bfloat16().float())
    assert out.y.dtype == torch.bfloat16 and out.final_state.dtype == torch.bfloat16
    torch.testing.assert_close(out.y, ref.bfloat16())
    y_t, _ = causal_conv1d_step(init.bfloat16(), x[..., 0].bfloat16(), w, bias)
    torch.testing.assert_close(y_t, out.y[..., 0])


def test_kernel_selection_falls_back_on_strided_inputs(monkeypatch):
    """'auto' takes causal-conv1d only where it supports the call as laid out: the mixer's xBC is a
    channel-last view of the fused in_proj output (stride = projection width, 260 for the tiny
    model: not a multiple of 8); with initial states the kernel gets a channel-last copy (d % 8)."""
    from twotower.model import kernels
    from twotower.model.causal_conv import _kernel_strides

    monkeypatch.setattr(kernels, "has_module", lambda name: True)  # as if causal-conv1d were installed
    fused = torch.randn(2, 16, 260)  # [b, s, proj]: xBC = a channel slice, viewed (b, d, l)
    xbc = fused[..., 4:4 + 64].transpose(1, 2)
    assert xbc.stride() == (16 * 260, 1, 260)
    why = kernels.conv_limits(tuple(xbc.shape), _kernel_strides(xbc, None), 4, "silu")
    assert "% 8 == 0 (got 4160, 260)" in why
    ok = torch.randn(2, 16, 256)[..., :64].transpose(1, 2)
    assert kernels.conv_limits(tuple(ok.shape), _kernel_strides(ok, None), 4, "silu") is None
    assert kernels.conv_limits((2, 64, 16), (1024, 16, 1), 4, "silu") is None  # channel-first
    init = torch.zeros(2, 260, 3)
    assert "% 8" in kernels.conv_limits((2, 260, 16), _kernel_strides(torch.zeros(2, 260, 16), init), 4, "silu")
    assert "width" in kernels.conv_limits((2, 64, 16), (1024, 16, 1), 5, "silu")
    # the selector: auto falls back, an explicit request says why it cannot run
    cuda_like = torch.zeros(1)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.select("conv", "auto", cuda_like, why) == "torch"
    assert kernels.select("conv", "auto", cuda_like, None) == "kernel"
    assert kernels.select("ssd", "auto", cuda_like) == "kernel"
    with pytest.raises(RuntimeError, match="causal_conv1d kernel cannot run this conv call: channel-last"):
        kernels.select("conv", "mamba_ssm", cuda_like, why)
    with pytest.raises(ValueError, match="unknown conv backend 'causal_conv1d'"):
        kernels.select("conv", "causal_conv1d", cuda_like, None)


def test_kernel_selection_on_cpu_tensors_is_torch_and_mamba_ssm_refuses():
    from twotower.model import kernels

    x = torch.zeros(1, 8, 4)
    assert kernels.select("conv", "auto", x, None) == "torch"
    assert kernels.select("ssd", "torch", x) == "torch"
    with pytest.raises(RuntimeError, match="needs the mamba_ssm package and CUDA tensors"):
        kernels.select("ssd", "mamba_ssm", x)
    # the mixer's own call path: auto on CPU runs (torch) whatever the strides
    fused = torch.randn(1, 8, 260)
    out = causal_conv1d(fused[..., :64].transpose(1, 2), torch.randn(64, 4), backend="auto")
    assert out.y.shape == (1, 64, 8)
