"""Tests for model/ssd.py: the chunked SSD scan against a token-by-token float64 recurrence (written
here, independently of the module) and against HF's nemotron_h ``mamba2_chunk_scan``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import twotower.model.ssd as ssd_mod
from twotower.model.ssd import ssd_chunk_scan, ssd_step


def naive_ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")),
              init=None):
    """Sequential float64 reference: returns y (b, l, h, p) and all states (b, l, h, p, n)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    r = h // B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*dt_limit)
    state = init.double() if init is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys, states = [], []
    for t in range(l):
        Bt = B[:, t].repeat_interleave(r, dim=1)  # (b, h, n)
        Ct = C[:, t].repeat_interleave(r, dim=1)
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        y = (state * Ct[:, :, None]).sum(-1)
        if D is not None:
            y = y + D.double()[:, None] * x[:, t]
        ys.append(y)
        states.append(state)
    return torch.stack(ys, 1), torch.stack(states, 1)


def make(b=2, l=37, h=4, p=3, g=2, n=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return {
        "x": r(b, l, h, p), "dt": r(b, l, h), "A": -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1,
        "B": r(b, l, g, n), "C": r(b, l, g, n), "D": r(h), "dt_bias": r(h), "init": r(b, h, p, n),
    }


def run(t, **kw):
    return ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], backend="torch", **kw)


@pytest.mark.parametrize(
    "shape,chunk,use_D,use_bias,use_init,limit",
    [
        ({"l": 37, "h": 4, "g": 2}, 8, True, True, True, (0.0, float("inf"))),  # l % chunk != 0, g < h
        ({"l": 32, "h": 4, "g": 4}, 8, False, False, False, (0.0, float("inf"))),  # g == h, l % chunk == 0
        ({"l": 50, "h": 6, "g": 1}, 16, True, False, True, (0.05, 0.5)),  # one group, dt_limit
        ({"l": 5, "h": 2, "g": 1}, 16, False, True, True, (0.0, float("inf"))),  # l < chunk
        ({"l": 300, "h": 2, "g": 2, "b": 1}, 4, True, True, True, (0.0, float("inf"))),  # 75 chunks: blocked scan
    ],
)
def test_matches_sequential(shape, chunk, use_D, use_bias, use_init, limit):
    t = make(**shape)
    D, bias, init = (t["D"] if use_D else None), (t["dt_bias"] if use_bias else None), (t["init"] if use_init else None)
    out = run(t, chunk_size=chunk, D=D, dt_bias=bias, dt_limit=limit, initial_states=init, return_final_state=True)
    y_ref, s_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], D, bias, True, limit, init)
    assert out.y.dtype == torch.float32 and out.final_state.dtype == torch.float32
    assert out.boundary_states is None
    torch.testing.assert_close(out.y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.final_state.double(), s_ref[:, -1], atol=1e-5, rtol=1e-5)


def test_no_softplus_and_low_precision_input():
    t = make(l=24)
    dt = t["dt"].abs() * 0.3  # already positive: dt_softplus=False path
    out = ssd_chunk_scan(t["x"].bfloat16(), dt, t["A"], t["B"].bfloat16(), t["C"].bfloat16(), chunk_size=8,
                         dt_softplus=False, backend="torch")
    y_ref, _ = naive_ssd(t["x"].bfloat16(), dt, t["A"], t["B"].bfloat16(), t["C"].bfloat16(), dt_softplus=False)
    assert out.y.dtype == torch.bfloat16
    torch.testing.assert_close(out.y.double(), y_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("S,chunk", [(4, 16), (16, 16), (32, 8), (12, 8), (24, 16), (7, 16)])
def test_boundary_states(S, chunk):
    # (4, 16), (7, 16): S < chunk -> chunk 16 / 14 with a sub-block scan ((7, 16) also pads);
    # (16, 16), (32, 8): boundaries are chunk ends; (12, 8), (24, 16): S > chunk -> chunk 6 / 12.
    t = make(l=S * 5, b=1)
    out = run(t, chunk_size=chunk, D=t["D"], dt_bias=t["dt_bias"], initial_states=t["init"], state_every=S,
              return_final_state=True)
    y_ref, s_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], init=t["init"])
    assert out.boundary_states.shape == (1, 5, 4, 3, 5)
    torch.testing.assert_close(out.boundary_states.double(), s_ref[:, S - 1 :: S], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.boundary_states[:, -1], out.final_state)
    torch.testing.assert_close(out.y.double(), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,chunk", [(None, 2), (1, 8), (2, 2)])
def test_multilevel_state_scan(monkeypatch, S, chunk):
    # A tiny scan block forces the recursive (blocked) inter-chunk scan through several levels.
    monkeypatch.setattr(ssd_mod, "_SCAN_BLOCK", 4)
    t = make(l=100, b=1, h=2, g=1)
    out = run(t, chunk_size=chunk, D=t["D"], initial_states=t["init"], state_every=S, return_final_state=True)
    y_ref, s_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], init=t["init"])
    torch.testing.assert_close(out.y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.final_state.double(), s_ref[:, -1], atol=1e-5, rtol=1e-5)
    if S is not None:
        torch.testing.assert_close(out.boundary_states.double(), s_ref[:, S - 1 :: S], atol=1e-5, rtol=1e-5)


def test_boundary_states_separate_pass():
    # S = 53 (prime) > chunk = 16: the only divisor <= 16 is 1, so the separate block-state pass runs.
    t = make(l=106, b=1, h=2, g=1)
    out = run(t, chunk_size=16, dt_bias=t["dt_bias"], initial_states=t["init"], state_every=53)
    _, s_ref = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], dt_bias=t["dt_bias"], init=t["init"])
    torch.testing.assert_close(out.boundary_states.double(), s_ref[:, 52::53], atol=1e-5, rtol=1e-5)


def test_state_every_must_divide_length():
    t = make(l=30)
    with pytest.raises(ValueError, match="multiple of state_every"):
        run(t, chunk_size=8, state_every=8)
    with pytest.raises(ValueError, match="backend"):
        ssd_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=8, backend="nope")


def test_two_halves_equal_one_scan():
    t = make(l=40)
    kw = {"chunk_size": 8, "D": t["D"], "dt_bias": t["dt_bias"]}
    full = run(t, initial_states=t["init"], return_final_state=True, **kw)
    half = lambda s: {k: (v[:, s] if v.dim() > 1 and k != "init" else v) for k, v in t.items()}
    a = run(half(slice(0, 17)), initial_states=t["init"], return_final_state=True, **kw)
    b = run(half(slice(17, 40)), initial_states=a.final_state, return_final_state=True, **kw)
    torch.testing.assert_close(torch.cat([a.y, b.y], 1), full.y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.final_state, full.final_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S", [4, 16])
def test_blockwise_seeded_equals_full(S):
    """The denoiser's use: block k scanned on its own, seeded with boundary state k-1."""
    t = make(l=4 * S)
    kw = {"chunk_size": 8, "D": t["D"], "dt_bias": t["dt_bias"]}
    full = run(t, initial_states=t["init"], state_every=S, **kw)
    seeds = torch.cat([t["init"][:, None], full.boundary_states[:, :-1]], 1)
    for k in range(4):
        blk = {n: (v[:, k * S:(k + 1) * S] if v.dim() > 1 and n != "init" else v) for n, v in t.items()}
        out = run(blk, initial_states=seeds[:, k], **kw)
        torch.testing.assert_close(out.y, full.y[:, k * S:(k + 1) * S], atol=1e-5, rtol=1e-5)


def test_matches_hf_mamba2_chunk_scan():
    nh = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    t = make(l=45, h=4, g=2, n=8, p=4)
    for init in (None, t["init"]):
        ref = nh.mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], dt_bias=t["dt_bias"],
                                   initial_states=init, dt_softplus=True, dt_limit=(0.0, 3.0),
                                   return_final_states=True)
        out = run(t, chunk_size=16, D=t["D"], dt_bias=t["dt_bias"], initial_states=init, dt_limit=(0.0, 3.0),
                  return_final_state=True)
        torch.testing.assert_close(out.y, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.final_state, ref[1], atol=1e-5, rtol=1e-5)


def test_gradcheck():
    t = make(b=1, l=6, h=2, p=2, g=1, n=2, dtype=torch.float64)
    A, D, bias = t["A"], t["D"], t["dt_bias"]

    def f(x, dt, B, C, init):
        out = ssd_chunk_scan(x, dt, A, B, C, chunk_size=4, D=D, dt_bias=bias, initial_states=init,
                             state_every=2, return_final_state=True, backend="torch")
        return out.y, out.final_state, out.boundary_states

    inputs = [t[k].requires_grad_() for k in ("x", "dt", "B", "C", "init")]
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)


def test_grads_match_sequential():
    t = make(b=1, l=40, h=4, g=2)
    leaves = {k: t[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "init")}
    out = ssd_chunk_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size=8,
                         D=leaves["D"], dt_bias=leaves["dt_bias"], initial_states=leaves["init"], state_every=4,
                         backend="torch")
    w = torch.randn_like(out.boundary_states)
    (out.y.square().sum() + (out.boundary_states * w).sum()).backward()
    ref = {k: t[k].double().requires_grad_() for k in leaves}
    y_ref, s_ref = naive_ssd(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], ref["D"], ref["dt_bias"],
                             init=ref["init"])
    (y_ref.square().sum() + (s_ref[:, 3::4] * w.double()).sum()).backward()
    for k, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad.double(), ref[k].grad, atol=1e-4, rtol=1e-4, msg=k)


def test_step_iterated_equals_scan():
    t = make(l=12, h=4, g=2)
    full = run(t, chunk_size=8, D=t["D"], dt_bias=t["dt_bias"], dt_limit=(0.0, 2.0), initial_states=t["init"],
               return_final_state=True)
    state, ys = t["init"], []
    for i in range(12):
        y, state = ssd_step(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"],
                            t["dt_bias"], True, (0.0, 2.0))
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), full.y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, full.final_state, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [None, 16, 256])
def test_mamba_ssm_backend_matches_torch(S):
    pytest.importorskip("mamba_ssm")
    t = {k: v.cuda() for k, v in make(b=2, l=512, h=8, p=16, g=2, n=32).items()}
    kw = {"chunk_size": 128, "D": t["D"], "dt_bias": t["dt_bias"], "dt_limit": (0.0, 4.0), "state_every": S,
              "return_final_state": True}
    grads = {}
    for backend in ("torch", "mamba_ssm"):
        leaves = {k: t[k].clone().requires_grad_() for k in ("x", "dt", "B", "C", "init")}
        out = ssd_chunk_scan(leaves["x"], leaves["dt"], t["A"], leaves["B"], leaves["C"],
                             initial_states=leaves["init"], backend=backend, **kw)
        loss = out.y.square().mean() + out.final_state.square().mean()
        if S is not None:
            loss = loss + out.boundary_states.square().mean()
        loss.backward()
        grads[backend] = (out, {k: v.grad for k, v in leaves.items()})
    (o_t, g_t), (o_m, g_m) = grads["torch"], grads["mamba_ssm"]
    torch.testing.assert_close(o_m.y, o_t.y, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(o_m.final_state, o_t.final_state, atol=1e-3, rtol=1e-3)
    if S is not None:
        torch.testing.assert_close(o_m.boundary_states, o_t.boundary_states, atol=1e-3, rtol=1e-3)
    for k in g_t:
        torch.testing.assert_close(g_m[k], g_t[k], atol=1e-3, rtol=1e-3, msg=k)


@pytest.mark.parametrize("use_init", [True, False])
def test_short_sequence_without_states_matches_sequential(use_init):
    """A denoiser block (l < chunk, no state requested) takes the no-state, no-padding path."""
    t = make(l=12, h=4, g=2)
    init = t["init"] if use_init else None
    out = run(t, chunk_size=64, D=t["D"], dt_bias=t["dt_bias"], initial_states=init)
    y_ref, _ = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], True,
                         (0.0, float("inf")), init)
    assert out.final_state is None and out.boundary_states is None
    torch.testing.assert_close(out.y.double(), y_ref, atol=1e-5, rtol=1e-5)
