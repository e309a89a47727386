"""Tests of the released-TwoTower oracle itself (``released_reference.py``): transformers parity of
the context tower, cache bookkeeping, mock-AR == AR, the adaLN precision chain and modulation order,
and the mask-diffusion decoder rules against a scripted fake denoiser."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import released_reference as rr
import torch
from hf_tiny import TINY_CONFIGS, hf_logits, tiny_hf_model
from released_reference import ReleasedTwoTower, diffusion_predict, released_state_dict, scaled_time

TOL = 1e-4
MASK, EOS, V, H = 3, 2, 96, 32


def hf_config(hf, **extra) -> dict:
    """The HF config as a dict. transformers' NemotronH clamps Δ >= time_step_min (the release: no clamp
    by default), so parity runs set that limit explicitly."""
    cfg = hf.config.to_dict()
    cfg["time_step_limit"] = (hf.config.time_step_min, math.inf)
    cfg.update(extra)
    return cfg


def ids_(b, n, seed=0):
    return torch.randint(4, V, (b, n), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=TOL):
    return (a.float() - b.float()).abs().max().item() <= tol


@pytest.fixture(scope="module")
def hf_all():
    return tiny_hf_model("all_types")  # pattern M * E - M E


@pytest.fixture(scope="module")
def ref(hf_all):
    """Denoiser = copy of the context tower, the release's random adaLN init."""
    return ReleasedTwoTower(hf_config(hf_all), released_state_dict(hf_all.state_dict()))


# ------------------------------------------------------------------------------ layout and parity
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_context_logits_match_transformers(name):
    hf = tiny_hf_model(name)
    model = ReleasedTwoTower(hf_config(hf), released_state_dict(hf.state_dict()))
    ids = ids_(2, 19, seed=3)
    got = model.context_logits(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 19, V)
    assert close(got, hf_logits(hf, ids)), (got - hf_logits(hf, ids)).abs().max()


def test_released_key_set_shapes_and_errors():
    hf = tiny_hf_model("all_types", layers_block_type=["linear_attention", "full_attention", "moe"])  # M*E
    hf_sd = hf.state_dict()
    sd = released_state_dict(hf_sd)
    prefixes = ("context_tower.", "denoiser_tower.", "t_embedder.", "t_block.", "scale_shift_tables.")
    assert all(k.startswith(prefixes) or k in ("lm_head.weight", "context_lm_head.weight") for k in sd)
    for tower in ("context_tower", "denoiser_tower"):
        assert sd[f"{tower}.layers.0.mixer.in_proj.weight"].shape == (2 * 32 + 2 * 2 * 8 + 4, H)
        assert sd[f"{tower}.layers.0.mixer.conv1d.weight"].shape == (32 + 2 * 2 * 8, 1, 4)
        assert sd[f"{tower}.layers.1.mixer.k_proj.weight"].shape == (2 * 8, H)
        assert sd[f"{tower}.layers.2.mixer.experts.3.up_proj.weight"].shape == (16, H)
        assert sd[f"{tower}.layers.2.mixer.experts.3.down_proj.weight"].shape == (H, 16)
        assert not any(k.endswith(("experts.up_proj", "experts.down_proj")) for k in sd)
    assert torch.equal(sd["denoiser_tower.layers.2.mixer.experts.1.down_proj.weight"],
                       hf_sd["model.layers.2.mixer.experts.down_proj"][1])
    assert torch.equal(sd["context_lm_head.weight"], hf_sd["lm_head.weight"])
    adaln = {k: v for k, v in sd.items() if k.startswith(("t_", "scale_shift"))}
    assert {k: tuple(v.shape) for k, v in adaln.items()} == {
        "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,), "t_embedder.mlp.2.weight": (H, H),
        "t_embedder.mlp.2.bias": (H,), "t_block.1.weight": (3 * H, H), "t_block.1.bias": (3 * H,),
        **{f"scale_shift_tables.{i}": (3, H) for i in range(3)}}
    again = released_state_dict({k.replace("model.", "backbone.", 1): v for k, v in hf_sd.items()})
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)  # fixed-seed adaLN
    model = ReleasedTwoTower(hf_config(hf), sd)
    assert set(model.expected_shapes()) == set(sd)
    with pytest.raises(KeyError, match="t_block.1.bias"):
        ReleasedTwoTower(hf_config(hf), {k: v for k, v in sd.items() if k != "t_block.1.bias"})
    with pytest.raises(KeyError, match="context_tower.layers.3.norm.weight"):
        ReleasedTwoTower(hf_config(hf), {**sd, "context_tower.layers.3.norm.weight": torch.ones(H)})
    with pytest.raises(ValueError, match="scale_shift_tables.1"):
        ReleasedTwoTower(hf_config(hf), {**sd, "scale_shift_tables.1": torch.ones(2, H)})


# ----------------------------------------------------------------------------- caches (§8)
def test_prefill_and_token_extension_reproduce_the_full_pass(ref):
    ids = ids_(2, 13)
    full = ref.context_logits(ids)
    cache = ref.prefill(ids[:, :5])
    assert close(cache.logits, full[:, 4])
    for j in range(5, 13):
        cache, logits = ref.extend(cache, ids[:, j:j + 1], block_wise=False)
        assert close(logits, full[:, j]), j
    whole = ref.prefill(ids)
    assert cache.length == whole.length == 13 and all(k.shape[2] == 13 for k in whole.k.values())
    for i in whole.k:
        assert close(cache.k[i], whole.k[i], 1e-5) and close(cache.v[i], whole.v[i], 1e-5)
    for i in whole.conv:
        assert close(cache.conv[i], whole.conv[i], 1e-5) and close(cache.ssm[i], whole.ssm[i], 1e-5)
    head = ref.prefill(ids[:, :12])  # "S-2" = the Mamba states after all but the last prompt token
    for i in whole.conv:
        assert close(whole.s2_conv[i], head.conv[i], 1e-5) and close(whole.s2_ssm[i], head.ssm[i], 1e-5)


@pytest.mark.parametrize("block", [1, 2, 4, 6])
def test_block_extension_reproduces_the_full_pass(ref, block):
    ids = ids_(2, 5 + block + 3, seed=1)
    full = ref.context_logits(ids)
    cache, logits = ref.extend(ref.prefill(ids[:, :5]), ids[:, 5:5 + block], block_wise=True)
    assert logits is None and cache.length == 5 + block
    want = ref.prefill(ids[:, :5 + block])
    for i in want.k:
        assert close(cache.k[i], want.k[i], 1e-5) and close(cache.v[i], want.v[i], 1e-5)
    for i in want.conv:
        assert close(cache.conv[i], want.conv[i], 1e-5) and close(cache.ssm[i], want.ssm[i], 1e-5)
    for j in range(5 + block, ids.shape[1]):
        cache, logits = ref.extend(cache, ids[:, j:j + 1], block_wise=False)
        assert close(logits, full[:, j]), j


def test_length_one_prompt_and_ar_greedy(ref):
    prompt = ids_(2, 1, seed=4)
    out = ref.generate_ar(prompt, 5)
    for j in range(1, 6):  # each token is the argmax of a fresh causal pass over the prefix
        assert torch.equal(out[:, j], ref.context_logits(out[:, :j])[:, -1].argmax(-1))
    assert torch.equal(ref.generate_mock_ar(prompt, 5), out)
    diff, nfe = ref.generate_mask_diffusion(prompt, 4, block_size=4, steps_per_block=4)
    assert diff.shape == (2, 5) and not (diff == MASK).any() and 1 <= nfe <= 4


def test_ar_eos_and_sampling(ref):
    prompt = ids_(2, 4, seed=5)
    greedy = ref.generate_ar(prompt, 6)
    eos = int(greedy[0, 6])
    stopped = ref.generate_ar(prompt, 6, eos_token_id=eos)
    assert torch.equal(stopped, greedy[:, :7])  # stops right after the step where a row emits eos
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ref.generate_ar(prompt, 6, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(ref.generate_ar(prompt, 6, temperature=1.0, top_p=1e-6, generator=g), greedy)
    a = ref.generate_ar(prompt, 6, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = ref.generate_ar(prompt, 6, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_mock_ar_equals_ar_with_a_copied_denoiser(ref):
    prompt = ids_(2, 5, seed=2)
    ar = ref.generate_ar(prompt, 10)
    assert torch.equal(ref.generate_mock_ar(prompt, 10), ar)
    cache, last = ref.prefill(prompt), prompt[:, -1:]
    for j in range(5, 15):  # logits, not only tokens: the denoiser replays the context tower's last step
        assert close(ref.mock_ar_logits(cache, last), cache.logits, 1e-5)
        last = ar[:, j:j + 1]
        cache = ref.extend(cache, last, block_wise=False)[0]
    unshifted = ref._tower("denoiser_tower", "lm_head.weight", last, cache, causal=True, clamp=True)[0][:, -1]
    assert not close(unshifted, cache.logits)  # without the S-2 / KV[:-1] shift it would not match


# ----------------------------------------------------------------------- denoiser block (§7)
def test_denoiser_block_seeding_mask_and_clamp(hf_all, ref):
    ids = ids_(2, 10, seed=6)
    full, cache = ref.context_logits(ids), ref.prefill(ids[:, :6])
    assert close(ref.denoise_block(ids[:, 6:7], None, cache), full[:, 6:7])  # all context keys, S-1 states
    a = ref.denoise_block(ids[:, 6:10], None, cache)
    edited = ids[:, 6:10].clone()
    edited[:, 3] = 4 + (edited[:, 3] - 3) % (V - 4)
    assert not close(ref.denoise_block(edited, None, cache)[:, 0], a[:, 0])  # no causal mask in the block
    hf_ssm = tiny_hf_model("all_types", layers_block_type=["linear_attention", "moe", "linear_attention", "mlp"])
    ssm = ReleasedTwoTower(hf_config(hf_ssm), released_state_dict(hf_ssm.state_dict()))
    full, cache = ssm.context_logits(ids), ssm.prefill(ids[:, :6])
    assert close(ssm.denoise_block(ids[:, 6:10], None, cache), full[:, 6:10])  # seeded causal scan, L > K
    cache = ref.prefill(ids[:, :6])
    # Δ is clamped by time_step_limit only in the stock paths: not in the block scan / block extension
    sd = released_state_dict(hf_all.state_dict())
    clamped = ReleasedTwoTower(hf_config(hf_all, time_step_limit=(3.0, math.inf)), sd)
    assert not close(clamped.context_logits(ids), ref.context_logits(ids))
    t = torch.tensor([0.5, 0.25])
    assert torch.equal(clamped.denoise_block(ids[:, 6:10], t, cache), ref.denoise_block(ids[:, 6:10], t, cache))
    x, y = clamped.extend(cache, ids[:, 6:10], True)[0], ref.extend(cache, ids[:, 6:10], True)[0]
    assert all(torch.equal(x.ssm[i], y.ssm[i]) for i in x.ssm)


def test_training_logits_block_by_block(hf_all):
    den = tiny_hf_model("all_types", seed=9)
    model = ReleasedTwoTower(hf_config(hf_all), released_state_dict(hf_all.state_dict(), den.state_dict()))
    x0 = ids_(2, 12, seed=8)
    xt = torch.where(torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.5, MASK, x0)
    t = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.6, 0.7]])
    got = model.training_logits(x0, xt, t, 4)
    assert got.shape == (2, 12, V)
    assert close(got[:, :4], model.denoise_block(xt[:, :4], t[:, 0], model.empty_cache(2)), 1e-5)
    for b in (1, 2):
        want = model.denoise_block(xt[:, 4 * b:4 * b + 4], t[:, b], model.prefill(x0[:, :4 * b]))
        assert close(got[:, 4 * b:4 * b + 4], want, 1e-5)
    other = model.training_logits(torch.where(x0 > 50, x0 - 1, x0 + 1), xt, t, 4)
    assert torch.equal(other[:, :4], got[:, :4]) and not close(other[:, 4:8], got[:, 4:8])


# ------------------------------------------------------------------------------------ adaLN (§6)
BF16_SCALED = [1000, 936, 876, 812, 752, 688, 624, 564, 500, 438, 376, 312, 250, 188, 125, 62.5]


def test_time_precision_chain_in_bf16(hf_all, monkeypatch):
    t = torch.arange(16, 0, -1, dtype=torch.float32) / 16  # k/16 for k = 16 .. 1 masked tokens
    s = scaled_time(t, torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.float().tolist() == BF16_SCALED
    assert scaled_time(t, torch.float32).tolist() != BF16_SCALED  # 1000 k / 16 is not what the release feeds
    # k/16 is exact in bf16, so it cannot tell "cast, then x1000" from "x1000, then cast"; a training t can:
    # bf16(0.0012) = 157/128 * 2^-10, x1000 = 1.19781 -> bf16 1.1953125 (x1000 first: 1.2 -> 1.203125)
    assert scaled_time(torch.tensor([0.0012]), torch.bfloat16).item() == 1.1953125
    seen = []
    real = rr.timestep_embedding
    monkeypatch.setattr(rr, "timestep_embedding", lambda s, dim=256: seen.append(s) or real(s, dim))
    model = ReleasedTwoTower(hf_config(hf_all), released_state_dict(hf_all.state_dict()), dtype=torch.bfloat16)
    logits = model.denoise_block(ids_(16, 16), t, model.prefill(ids_(16, 3)))
    assert logits.dtype == torch.float32 and seen[0].dtype == torch.bfloat16
    assert seen[0].float().tolist() == BF16_SCALED


def test_sinusoid_is_cos_then_sin_with_period_10000():
    e = rr.timestep_embedding(torch.tensor([0.0, 62.5]), 256)
    assert e.shape == (2, 256) and torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    for j in (0, 5, 127):
        f = math.exp(-math.log(10000.0) * j / 128)
        assert abs(e[1, j] - math.cos(62.5 * f)) < 1e-5 and abs(e[1, 128 + j] - math.sin(62.5 * f)) < 1e-5


def constant_adaln(n_layers, shift, scale, gate):
    """t_block outputs zero, so (shift, scale, gate) are the tables: constant vectors for every t."""
    g = torch.Generator().manual_seed(0)
    out = {"t_embedder.mlp.0.weight": torch.randn(H, 256, generator=g), "t_embedder.mlp.0.bias": torch.zeros(H),
           "t_embedder.mlp.2.weight": torch.randn(H, H, generator=g), "t_embedder.mlp.2.bias": torch.zeros(H),
           "t_block.1.weight": torch.zeros(3 * H, H), "t_block.1.bias": torch.zeros(3 * H)}
    table = torch.stack([torch.full((H,), float(v)) for v in (shift, scale, gate)])
    return out | {f"scale_shift_tables.{i}": table.clone() for i in range(n_layers)}


def test_modulation_order_per_layer_type(hf_all, monkeypatch):
    """shift 0, scale c, gate 1: RMSNorm is scale-invariant, so modulate->norm (M, *) is a no-op while
    norm->modulate (E, -) equals a norm weight times (1 + c). Compare with that hand-built model."""
    c, cfg = 0.7, hf_config(hf_all, layer_norm_epsilon=1e-12)
    pattern = rr.layer_pattern(cfg)
    assert set(pattern) == set("M*E-")
    model = ReleasedTwoTower(cfg, released_state_dict(hf_all.state_dict(), adaln=constant_adaln(6, 0, c, 1)))
    sd = released_state_dict(hf_all.state_dict(), adaln=constant_adaln(6, 0, 0, 1))
    for i, kind in enumerate(pattern):
        if kind in "E-":
            sd[f"denoiser_tower.layers.{i}.norm.weight"] = sd[f"denoiser_tower.layers.{i}.norm.weight"] * (1 + c)
    hand = ReleasedTwoTower(cfg, sd)
    ids = ids_(2, 9, seed=11)
    cache, t = model.prefill(ids[:, :5]), torch.tensor([0.75, 0.25])
    want = hand.denoise_block(ids[:, 5:9], None, cache)
    assert close(model.denoise_block(ids[:, 5:9], t, cache), want, 1e-5)
    for swapped in ("", "M*E-", "E-"):  # norm->modulate everywhere (the §9.3 trap), or the reverse
        monkeypatch.setattr(rr, "MODULATE_BEFORE_NORM", swapped)
        assert not close(model.denoise_block(ids[:, 5:9], t, cache), want), swapped


def test_gate_multiplies_the_mixer_output_as_is(hf_all):
    g = 2.0
    model = ReleasedTwoTower(hf_config(hf_all), released_state_dict(hf_all.state_dict(), adaln=constant_adaln(6, 0, 0, g)))
    sd = released_state_dict(hf_all.state_dict())
    for k in sd:
        if k.startswith("denoiser_tower.layers.") and k.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            sd[k] = sd[k] * g
    hand = ReleasedTwoTower(hf_config(hf_all), sd)
    ids = ids_(2, 9, seed=12)
    cache = model.prefill(ids[:, :5])
    assert close(model.denoise_block(ids[:, 5:9], torch.tensor([0.5, 0.5]), cache),
                 hand.denoise_block(ids[:, 5:9], None, cache), 1e-5)


# ------------------------------------------------------------------------------ decoder (§9.2)
def peaked(tokens, strengths):
    """Logits [B, L, V]: 0 everywhere, `strengths` at `tokens`, +50 on the mask id (must be ignored)."""
    tokens, strengths = torch.as_tensor(tokens), torch.as_tensor(strengths, dtype=torch.float32)
    logits = torch.zeros(*tokens.shape, V).scatter(-1, tokens[..., None], strengths[..., None])
    logits[..., MASK] = 50.0
    return logits


def scripted(model, monkeypatch, script):
    """Replace the denoiser by script(call_index, xt, ctx_len) -> logits; record every call."""
    calls = []

    def fake(xt, t, cache):
        calls.append(SimpleNamespace(xt=xt.clone(), t=t.clone(), ctx_len=cache.length))
        return script(len(calls) - 1, xt, cache.length)

    monkeypatch.setattr(model, "denoise_block", fake)
    return calls


def masked_counts(calls):
    return [int((c.xt == MASK).sum()) for c in calls]


def test_threshold_is_strict(ref, monkeypatch):
    logits = peaked([[10, 11, 12, 13]], [[3.0, 3.0, 0.5, 0.5]])
    conf = diffusion_predict(logits, MASK, 0.0)[1][0]
    gamma = float(conf[:2].min())  # a confidence exactly equal to γ does not count
    calls = scripted(ref, monkeypatch, lambda i, xt, n: logits)
    ref.generate_mask_diffusion(ids_(1, 3), 4, block_size=4, steps_per_block=16, confidence_threshold=gamma)
    assert masked_counts(calls)[:2] == [4, 3]
    calls.clear()
    below = float(torch.nextafter(conf[:2].min(), torch.tensor(0.0)))  # the next fp32 below γ
    ref.generate_mask_diffusion(ids_(1, 3), 4, block_size=4, steps_per_block=16, confidence_threshold=below)
    assert masked_counts(calls)[:2] == [4, 2]


def test_confidence_is_the_temperature_one_probability(ref, monkeypatch):
    logits = peaked([[10, 11, 12, 13]], [[3.0, 3.0, 0.5, 0.5]])  # p(peak) at T=1 ~ 0.18, at T=0.01 ~ 1
    calls = scripted(ref, monkeypatch, lambda i, xt, n: logits)
    out, _ = ref.generate_mask_diffusion(ids_(1, 3), 4, block_size=4, steps_per_block=16, temperature=0.01,
                                         generator=torch.Generator().manual_seed(0))
    assert masked_counts(calls)[:2] == [4, 3] and out[0, 3:].tolist() == [10, 11, 12, 13]


def test_min_commit_and_last_step(ref, monkeypatch):
    logits = peaked([list(range(10, 18))], [[0.5] * 8])  # nothing above γ: commit max(1, ceil(n / (T - k)))
    calls = scripted(ref, monkeypatch, lambda i, xt, n: logits)
    out, nfe = ref.generate_mask_diffusion(ids_(1, 3), 8, block_size=8, steps_per_block=5)
    assert masked_counts(calls) == [8, 6, 4, 2, 1] and nfe == 5
    assert out[0, 3:].tolist() == list(range(10, 18))
    calls.clear()
    out, nfe = ref.generate_mask_diffusion(ids_(1, 3), 16, block_size=8, steps_per_block=2)
    assert masked_counts(calls) == [8, 4, 8, 4] and nfe == 4 and not (out == MASK).any()  # last step: all


def test_remask_lowest_confidence_and_mask_logit_ignored(ref, monkeypatch):
    logits = peaked([[10, 11, 12, 13]], [[1.0, 4.0, 2.0, 3.0]])
    calls = scripted(ref, monkeypatch, lambda i, xt, n: logits)
    out, nfe = ref.generate_mask_diffusion(ids_(1, 3), 4, block_size=4, steps_per_block=16, confidence_threshold=0.999)
    committed = [(c.xt[0] != MASK).nonzero()[:, 0].tolist() for c in calls]
    assert committed == [[], [1], [1, 3], [1, 2, 3]] and nfe == 4
    assert out[0, 3:].tolist() == [10, 11, 12, 13]


def test_batch_mean_t(ref, monkeypatch):
    logits = peaked([[10, 11, 12, 13]] * 2, [[10.0, 10.0, 10.0, 0.5], [0.5] * 4])
    calls = scripted(ref, monkeypatch, lambda i, xt, n: logits)
    ref.generate_mask_diffusion(ids_(2, 3), 4, block_size=4, steps_per_block=16)
    assert [int(x) for x in (calls[1].xt == MASK).sum(-1)] == [1, 3]
    assert calls[0].t.tolist() == [1.0, 1.0] and calls[1].t.tolist() == [0.5, 0.5]  # not [0.25, 0.75]


def test_eos_stops_after_the_block_and_nfe(ref, monkeypatch):
    P = 3

    def script(i, xt, ctx_len):
        tokens = torch.tensor([[10, 11, 12, 13]] * 2)
        if ctx_len == P + 4:  # second block: row 1 emits eos mid-block
            tokens[1, 2] = EOS
        return peaked(tokens, torch.full((2, 4), 10.0))

    calls = scripted(ref, monkeypatch, script)
    out, nfe = ref.generate_mask_diffusion(ids_(2, P), 12, block_size=4, steps_per_block=4, eos_token_id=EOS)
    assert out.shape == (2, P + 8) and out[1, P + 4:].tolist() == [10, 11, EOS, 13]
    assert [c.ctx_len for c in calls] == [P, P + 4] and nfe == 2  # block-wise extension between blocks
    calls.clear()
    out, nfe = ref.generate_mask_diffusion(ids_(2, P), 12, block_size=4, steps_per_block=4)
    assert out.shape == (2, P + 12) and nfe == len(calls) == 3
    with pytest.raises(ValueError, match="multiple"):
        ref.generate_mask_diffusion(ids_(2, P), 10, block_size=4)


def test_diffusion_extends_the_context_block_wise(hf_all, monkeypatch):
    """Between blocks the context advances by the block-wise pass (no Δ clamp), not token by token."""
    model = ReleasedTwoTower(hf_config(hf_all, time_step_limit=(3.0, math.inf)), released_state_dict(hf_all.state_dict()))
    caches = []

    def fake(xt, t, cache):
        caches.append(cache)
        return peaked(torch.tensor([[10, 11, 12, 13]] * 2), torch.full((2, 4), 10.0))

    monkeypatch.setattr(model, "denoise_block", fake)
    prompt = ids_(2, 3)
    model.generate_mask_diffusion(prompt, 8, block_size=4, steps_per_block=4)
    block = torch.tensor([[10, 11, 12, 13]] * 2)
    block_wise = model.extend(model.prefill(prompt), block, block_wise=True)[0]
    token_wise = model.extend(model.prefill(prompt), block, block_wise=False)[0]
    assert caches[1].length == 7 and all(torch.equal(caches[1].ssm[i], block_wise.ssm[i]) for i in block_wise.ssm)
    assert not all(torch.equal(token_wise.ssm[i], block_wise.ssm[i]) for i in block_wise.ssm)


def test_mask_diffusion_end_to_end(ref):
    prompt = ids_(2, 4, seed=13)
    out, nfe = ref.generate_mask_diffusion(prompt, 8, block_size=4, steps_per_block=4, confidence_threshold=0.5)
    assert out.shape == (2, 12) and torch.equal(out[:, :4], prompt) and not (out == MASK).any() and 2 <= nfe <= 8
    kw = dict(block_size=4, steps_per_block=4, temperature=0.8)
    a = ref.generate_mask_diffusion(prompt, 8, generator=torch.Generator().manual_seed(1), **kw)
    b = ref.generate_mask_diffusion(prompt, 8, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
