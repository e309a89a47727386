"""Our Hugging Face remote code for the released TwoTower (``model/hf_remote``), with plain transformers.

Oracles: transformers' own ``NemotronHForCausalLM`` (the context tower's forward and greedy
generation), the context tower itself (mock-AR, the denoiser's seeded block forward), hand-computed
decoder rules (§9.2 of release.md) with a scripted denoiser, and the bf16 time values of §6.

``write_released_folder`` builds a released-format folder from two tiny HF models; reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import tiny_hf_model

REMOTE_DIR = Path(__file__).resolve().parents[2] / "model" / "hf_remote"
REMOTE_FILES = ("configuration_nemotron_twotower.py", "modeling_nemotron_twotower.py")
TOL = 1e-4
MASK = 3


def _remote_module(name: str):
    """Import one of the remote-code files by path (they are data, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_hf_remote_{name}", REMOTE_DIR / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    sys.path.insert(0, str(REMOTE_DIR))  # the modeling file's fallback import of its config
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REMOTE_DIR))
    return module


# ----------------------------------------------------------------------------------------------------
# Building a released-format folder
# ----------------------------------------------------------------------------------------------------
def tower_tensors(hf_model, prefix: str, head_key: str) -> dict[str, torch.Tensor]:
    """A ``NemotronHForCausalLM``'s tensors under the released names: ``model.``/``backbone.`` ->
    ``prefix``, ``lm_head.weight`` -> ``head_key``, fused 3-D experts split into one tensor per expert."""
    out = {}
    for key, value in hf_model.state_dict().items():
        if key == "lm_head.weight":
            out[head_key] = value
            continue
        key = re.sub(r"^(model|backbone)\.", "", key)
        fused = re.fullmatch(r"(layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)(\.weight)?", key)
        if fused and value.dim() == 3:  # transformers 5.x in memory: [E, F, H] / [E, H, F]
            out.update({f"{prefix}{fused[1]}.{e}.{fused[2]}.weight": value[e] for e in range(value.shape[0])})
        else:
            out[prefix + key] = value
    return out


def random_adaln(hidden: int, n_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random time-conditioning tensors with the released shapes (§3)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
              "t_block.1.weight": (3 * hidden, hidden), "t_block.1.bias": (3 * hidden,),
              **{f"scale_shift_tables.{i}": (3, hidden) for i in range(n_layers)}}
    return {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}


def identity_adaln(hidden: int, n_layers: int) -> dict[str, torch.Tensor]:
    """t_block zero and tables rows (shift 0, scale 0, gate 1): the modulation is the identity."""
    adaln = random_adaln(hidden, n_layers)
    adaln["t_block.1.weight"].zero_()
    adaln["t_block.1.bias"].zero_()
    for i in range(n_layers):
        adaln[f"scale_shift_tables.{i}"] = torch.tensor([0.0, 0.0, 1.0])[:, None].expand(3, hidden).clone()
    return adaln


def write_released_folder(path, ctx_hf_model, den_hf_model, adaln: dict | None = None,
                          shards: int = 2) -> Path:
    """A released-format TwoTower folder from two ``NemotronHForCausalLM`` (context, denoiser) of one config.

    ``adaln``: the time-conditioning tensors (None: :func:`random_adaln`). Writes ``shards`` safetensors
    files + ``model.safetensors.index.json``, a ``config.json`` with ``hybrid_override_pattern``,
    ``architectures`` and ``auto_map`` (no ``layers_block_type``), and copies our remote code next to it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ctx_hf_model.config
    pattern = config.hybrid_override_pattern
    tensors = {**tower_tensors(ctx_hf_model, "context_tower.", "context_lm_head.weight"),
               **tower_tensors(den_hf_model, "denoiser_tower.", "lm_head.weight"),
               **(adaln if adaln is not None else random_adaln(config.hidden_size, len(pattern)))}
    keys = sorted(tensors)
    per_shard = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].detach().contiguous().clone() for k in keys[s * per_shard:(s + 1) * per_shard]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = config.to_dict()
    cfg.pop("layers_block_type", None)
    cfg |= {"model_type": "nemotron_h", "hybrid_override_pattern": pattern,
            "architectures": ["NemotronHTwoTowerForCausalLM"], "tie_word_embeddings": False,
            "auto_map": _remote_module("configuration_nemotron_twotower").AUTO_MAP}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / f, path / f)
    return path


def load_released(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx_hf():
    return tiny_hf_model("all_types", seed=0)


@pytest.fixture(scope="module")
def den_hf():
    return tiny_hf_model("all_types", seed=1)


@pytest.fixture(scope="module")
def released(tmp_path_factory, ctx_hf, den_hf):
    """(folder, model, loading info): context seed 0, a different denoiser, random adaLN."""
    folder = write_released_folder(tmp_path_factory.mktemp("released"), ctx_hf, den_hf)
    model, info = load_released(folder)
    return folder, model, info


@pytest.fixture(scope="module")
def twin_hf():
    """Pattern M E M * E: attention is the last layer that mixes positions."""
    return tiny_hf_model("mamba_moe", seed=3)


@pytest.fixture(scope="module")
def twin(tmp_path_factory, twin_hf):
    """The denoiser is a copy of the context tower and the adaLN is the identity."""
    adaln = identity_adaln(twin_hf.config.hidden_size, twin_hf.config.num_hidden_layers)
    folder = write_released_folder(tmp_path_factory.mktemp("twin"), twin_hf, twin_hf, adaln)
    return load_released(folder)[0]


def _ids(batch: int, length: int, seed: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Loading, forward, generate
# ----------------------------------------------------------------------------------------------------
def test_loads_with_auto_classes_and_no_key_problems(released, den_hf):
    from transformers import AutoConfig

    folder, model, info = released
    assert type(model).__name__ == "NemotronHTwoTowerForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "NemotronHTwoTowerConfig" and config.model_type == "nemotron_h"
    assert config.layers_block_type == ["mamba", "attention", "moe", "mlp", "mamba", "moe"]
    assert "layers_block_type" not in config.to_dict()
    # one tensor per expert landed on the right expert, in the right tower
    fused = den_hf.model.layers[2].mixer.experts
    got = model.denoiser_tower.layers[2].mixer.experts
    assert torch.equal(got[1].up_proj.weight, fused.up_proj[1])
    assert torch.equal(got[3].down_proj.weight, fused.down_proj[3])
    assert torch.equal(model.lm_head.weight, den_hf.lm_head.weight)
    assert len(model.scale_shift_tables) == 6


def test_config_accepts_layers_block_type_lists():
    cfg_mod = _remote_module("configuration_nemotron_twotower")
    types = ["linear_attention", "full_attention", "moe", "mlp"]  # transformers 5.x's names
    cfg = cfg_mod.NemotronHTwoTowerConfig(layers_block_type=types, num_hidden_layers=4)
    assert cfg.hybrid_override_pattern == "M*E-" and cfg.num_hidden_layers == 4
    assert cfg.time_step_limit == (0.0, math.inf)
    with pytest.raises(ValueError):
        cfg_mod.NemotronHTwoTowerConfig(hybrid_override_pattern="M*X")


def test_forward_matches_transformers_nemotron_h(released, ctx_hf):
    # transformers' NemotronH clamps dt at time_step_min, ours at time_step_limit: hf_tiny makes them agree
    assert tuple(ctx_hf.config.time_step_limit) == (ctx_hf.config.time_step_min, math.inf)
    _, model, _ = released
    ids = _ids(2, 13, seed=1)
    with torch.no_grad():
        want = ctx_hf(input_ids=ids, use_cache=False).logits.float()
        out = model(input_ids=ids)
        got = out.logits
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL
        # continuing from the returned cache with several tokens at once (causal, bottom-right aligned)
        cache = model(input_ids=ids[:, :6]).cache
        more = model(input_ids=ids[:, 6:], past_key_values=cache).logits
    assert (more - want[:, 6:]).abs().max().item() <= TOL


def test_generate_greedy_matches_generate_ar_and_transformers(released, ctx_hf):
    _, model, _ = released
    ids = _ids(2, 7, seed=2)
    no_eos = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = ctx_hf.generate(ids, **no_eos)
        got = model.generate(ids, **no_eos)
    assert want.shape == (2, 17)
    assert torch.equal(got, want)
    assert torch.equal(model.generate_ar(ids, max_new_tokens=10), want)
    # eos: generate_ar stops after the step in which any row emitted it
    eos = int(want[1, 9])
    stop = (want[:, 7:] == eos).any(0).nonzero()[0].item()
    assert torch.equal(model.generate_ar(ids, max_new_tokens=10, eos_token_id=eos), want[:, :8 + stop])


def test_sampling_respects_top_k(released):
    _, model, _ = released
    ids = _ids(1, 5, seed=3)
    top1 = model.generate_ar(ids, max_new_tokens=6)
    torch.manual_seed(0)
    assert torch.equal(model.generate_ar(ids, max_new_tokens=6, temperature=1.0, top_k=1), top1)
    torch.manual_seed(0)
    assert torch.equal(model.generate_ar(ids, max_new_tokens=6, temperature=1.0, top_p=1e-6), top1)


# ----------------------------------------------------------------------------------------------------
# Caches and the denoiser (§7, §8)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [1, 3, 8])
def test_mock_ar_equals_ar_when_denoiser_is_the_context_tower(twin, prompt_len):
    ids = _ids(2, prompt_len, seed=10 + prompt_len)
    ar = twin.generate_ar(ids, max_new_tokens=9)
    assert ar.shape == (2, prompt_len + 9)
    assert torch.equal(twin.generate_mock_ar(ids, max_new_tokens=9), ar)


def test_mock_ar_uses_the_denoiser(released):
    _, model, _ = released
    ids = _ids(2, 6, seed=4)
    mock = model.generate_mock_ar(ids, max_new_tokens=9)
    assert mock.shape == (2, 15) and not torch.equal(mock, model.generate_ar(ids, max_new_tokens=9))


def test_dt_clamp_follows_time_step_limit_except_in_block_scans(tmp_path):
    # a clamp that bites: softplus(dt + dt_bias) is mostly below 1 here (dt_bias ~ U[-1, 1])
    hf = tiny_hf_model("mamba_moe", seed=4, time_step_min=1.0, time_step_limit=(1.0, math.inf))
    model = load_released(write_released_folder(tmp_path, hf, hf, shards=1))[0]
    ids = _ids(1, 9, seed=15)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - hf(input_ids=ids, use_cache=False).logits).abs().max() <= TOL
        ctx = model._build_context_cache(ids[:, :5])
        blockwise = model._extend_context_cache(ctx, ids[:, 5:], block_wise=True).cache.layers[0].ssm
        stepwise = model._extend_context_cache(ctx, ids[:, 5:], block_wise=False).cache.layers[0].ssm
    # the block-wise scan passes no dt clamp (§7, §8)
    assert (blockwise - stepwise).abs().max() > 0.01 * stepwise.abs().max()


def test_block_wise_extension_matches_token_by_token(released):
    _, model, _ = released
    ids, block = _ids(2, 9, seed=5), _ids(2, 5, seed=6)
    with torch.no_grad():
        ctx = model._build_context_cache(ids)
        blockwise = model._extend_context_cache(ctx, block, block_wise=True)
        stepwise = model._extend_context_cache(ctx, block, block_wise=False)
    assert blockwise.cache.length == stepwise.cache.length == 14
    assert blockwise.previous is ctx.cache  # the new "S-2" snapshot is the state before the block
    for a, b in zip(blockwise.cache.layers, stepwise.cache.layers):
        for x, y in ((a.conv, b.conv), (a.ssm, b.ssm), (a.key, b.key), (a.value, b.value)):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-5


def test_denoiser_block_sees_the_context_and_the_whole_block(twin, twin_hf):
    prompt, xt = _ids(2, 7, seed=7), _ids(2, 4, seed=8)
    with torch.no_grad():
        causal = twin_hf(input_ids=torch.cat([prompt, xt], 1), use_cache=False).logits.float()[:, 7:]
        cache = twin._build_context_cache(prompt).cache
        plain = twin._denoise_block(xt, None, cache)
        timed = twin._denoise_block(xt, torch.full((2,), 0.5), cache)
    # the last block position sees exactly what a causal model sees (seeded Mamba, context K/V, the block;
    # no layer after the attention mixes positions, so bidirectional attention does not reach it)
    assert (plain[:, -1] - causal[:, -1]).abs().max().item() <= TOL
    assert torch.equal(plain, timed)  # identity adaLN
    # earlier positions also see later block tokens: attention has no mask inside the block
    assert (plain[:, 0] - causal[:, 0]).abs().max().item() > 1e-3


def test_adaln_order_per_layer_type(released):
    """M and *: x + g·mixer(norm(modulate(x))); E and -: x + g·mixer(modulate(norm(x))) (§6.7)."""
    _, model, _ = released
    modeling = sys.modules[type(model).__module__]
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 32, generator=g)
    shift, scale, gate = (torch.randn(2, 1, 32, generator=g) for _ in range(3))
    empty = modeling.HybridCache.empty(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.denoiser_tower.layers[:4]):  # M * E -
            state = empty.layers[i]
            got, _ = layer(x, state, causal=False, block_scan=True, modulation=(shift, scale, gate))
            if layer.kind == "mamba":
                h = layer.mixer(layer.norm(x * (1 + scale) + shift), state, True)[0]
            elif layer.kind == "attention":
                h = layer.mixer(layer.norm(x * (1 + scale) + shift), state, False)[0]
            else:
                h = layer.mixer(layer.norm(x) * (1 + scale) + shift)
            assert torch.allclose(got, x + gate * h, atol=1e-6), layer.kind


def test_time_conditioning_changes_the_denoiser(released):
    _, model, _ = released
    cache = model._build_context_cache(_ids(1, 5, seed=9)).cache
    xt = torch.full((1, 4), MASK)
    with torch.no_grad():
        a = model._denoise_block(xt, torch.tensor([1.0]), cache)
        b = model._denoise_block(xt, torch.tensor([0.25]), cache)
    assert torch.isfinite(a).all() and (a - b).abs().max().item() > 1e-4


def test_bf16_time_precision_chain():
    modeling = _remote_module("modeling_nemotron_twotower")
    t = torch.arange(16, 0, -1) / 16
    fed = [1000, 936, 876, 812, 752, 688, 624, 564, 500, 438, 376, 312, 250, 188, 125, 62.5]
    assert (t.to(torch.bfloat16) * 1000).tolist() == fed
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = torch.tensor(fed)[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], -1).to(torch.bfloat16)  # cos block first
    got = modeling.sinusoidal_time_embedding(t, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    exact = (1000 * t)[:, None] * freqs[None]  # not 1000·k/16
    assert not torch.equal(got, torch.cat([torch.cos(exact), torch.sin(exact)], -1).to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------------
# Mask-diffusion decoding rules (§9.2) with a scripted denoiser
# ----------------------------------------------------------------------------------------------------
class ScriptedDenoiser:
    """Stands in for ``model._denoise_block``. Call c predicts token ``10 + c`` everywhere (or
    ``tokens[c]``) with probability ``confs[c]`` [B, L] (>= 0.1; the rest spread over tokens 50-89, so
    the prediction stays the argmax), and records (xt, t)."""

    def __init__(self, confs, tokens=None, vocab: int = 96):
        self.confs, self.tokens, self.vocab, self.calls = confs, tokens or {}, vocab, []

    def logits(self, c: int, batch: int, length: int) -> torch.Tensor:
        conf = torch.as_tensor(self.confs[c], dtype=torch.float32).expand(batch, length)
        tok = torch.as_tensor(self.tokens.get(c, 10 + c)).expand(batch, length)
        logits = torch.full((batch, length, self.vocab), -1e4)
        logits.scatter_(-1, tok[..., None], conf.log()[..., None])
        logits[..., 50:90] = torch.log((1 - conf) / 40)[..., None]
        logits[..., MASK] = 10.0  # the decoder must never predict the mask token
        return logits

    def __call__(self, xt, t, den_cache):
        self.calls.append((xt.clone(), t.clone()))
        return self.logits(len(self.calls) - 1, *xt.shape)


def _confidence(logits: torch.Tensor) -> torch.Tensor:
    """The probability of the argmax under the mask-constrained softmax (how the decoder computes it)."""
    logits = logits.clone()
    logits[..., MASK] = -1e12
    logp = logits.log_softmax(-1)
    return logp.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1).exp()


def _diffuse(model, monkeypatch, fake, prompt_len=3, batch=1, **kw):
    monkeypatch.setattr(model, "_denoise_block", fake)
    out = model.generate_mask_diffusion(_ids(batch, prompt_len, seed=11), mask_token_id=MASK, **kw)
    return out[:, prompt_len:]


def test_diffusion_commits_above_threshold_at_least_one_and_only_masked(released, monkeypatch):
    _, model, _ = released
    fake = ScriptedDenoiser([[0.95, 0.5, 0.97, 0.3],   # 2 above 0.9 -> commit positions 0 and 2
                             [0.99, 0.6, 0.99, 0.4],   # none masked above -> commit 1 (position 1)
                             [0.5, 0.5, 0.5, 0.2]])    # ceil(1 / 2) = 1 -> position 3; block done
    steps = []

    def callback(step, steps_per_block, xt, t, logits, block_idx):
        steps.append((step, t))

    got = _diffuse(model, monkeypatch, fake, max_new_tokens=4, block_size=4, steps_per_block=4,
                   confidence_threshold=0.9, step_callback=callback)
    assert got.tolist() == [[10, 11, 10, 12]]
    assert model._last_nfe == 3 and len(fake.calls) == 3
    assert [t.tolist() for _, t in fake.calls] == [[1.0], [0.5], [0.25]]
    assert steps == [(0, 1.0), (0, 1.0), (1, 0.5), (2, 0.25)]


def test_diffusion_threshold_is_strict(released, monkeypatch):
    _, model, _ = released
    fake = ScriptedDenoiser([[0.95, 0.96, 0.2, 0.1]] + [[0.5] * 4] * 3)
    threshold = _confidence(fake.logits(0, 1, 4))[0, 0].item()  # exactly position 0's confidence
    got = _diffuse(model, monkeypatch, fake, max_new_tokens=4, block_size=4, steps_per_block=4,
                   confidence_threshold=threshold)
    assert got[0, 1].item() == 10 and got[0, 0].item() != 10  # only position 1 counted as above


def test_diffusion_min_commit_and_last_step(released, monkeypatch):
    _, model, _ = released
    rising = [[0.1 + 0.01 * j for j in range(8)]] * 3  # never confident; later positions a bit more
    fake = ScriptedDenoiser(rising)
    got = _diffuse(model, monkeypatch, fake, max_new_tokens=8, block_size=8, steps_per_block=3)
    # step 0: ceil(8/3) = 3 (positions 5-7); step 1: ceil(5/2) = 3 (2-4); last step: all the rest
    assert got.tolist() == [[12, 12, 11, 11, 11, 10, 10, 10]]
    assert model._last_nfe == 3


def test_diffusion_batch_mean_time_and_per_row_counts(released, monkeypatch):
    _, model, _ = released
    fake = ScriptedDenoiser([[[0.99] * 4, [0.5, 0.4, 0.3, 0.2]],
                             [[0.1] * 4, [0.1, 0.95, 0.3, 0.2]],
                             [[0.1] * 4, [0.1, 0.1, 0.3, 0.2]],
                             [[0.1] * 4, [0.1, 0.1, 0.1, 0.2]]])
    got = _diffuse(model, monkeypatch, fake, batch=2, max_new_tokens=4, block_size=4, steps_per_block=4)
    assert got.tolist() == [[10, 10, 10, 10], [10, 11, 12, 13]]
    assert [t.tolist() for _, t in fake.calls] == [[1.0, 1.0], [0.375, 0.375], [0.25, 0.25], [0.125, 0.125]]


def test_diffusion_stops_after_the_block_with_eos(released, monkeypatch):
    _, model, _ = released
    extensions = []
    real_extend = model._extend_context_cache

    def spy(ctx, tokens, *, block_wise):
        extensions.append((tokens.shape[1], block_wise))
        return real_extend(ctx, tokens, block_wise=block_wise)

    monkeypatch.setattr(model, "_extend_context_cache", spy)
    eos_first = {0: [[10, 10], [2, 10]]}  # row 1 emits eos (2) at the start of block 0
    fake = ScriptedDenoiser([[0.99, 0.99]] * 6, tokens=eos_first)
    got = _diffuse(model, monkeypatch, fake, batch=2, max_new_tokens=6, block_size=2, steps_per_block=2,
                   eos_token_id=2)
    assert got.tolist() == [[10, 10], [2, 10]]  # the whole block is kept, nothing after it
    assert model._last_nfe == 1
    assert extensions == [(1, False), (2, True)]  # prefill's decode step, then the block (before stopping)
    fake = ScriptedDenoiser([[0.99, 0.99]] * 6, tokens=eos_first)
    got = _diffuse(model, monkeypatch, fake, batch=2, max_new_tokens=6, block_size=2, steps_per_block=2)
    assert got.shape == (2, 6)
    assert model._last_nfe == 3


def test_diffusion_rejects_partial_blocks(released):
    _, model, _ = released
    with pytest.raises(ValueError, match="multiple of block_size"):
        model.generate_mask_diffusion(_ids(1, 3, seed=12), max_new_tokens=6, block_size=4)


def test_diffusion_runs_the_real_denoiser(released):
    _, model, _ = released
    assert model.place_towers_on_devices("cpu", "cpu") is model
    out = model.generate_mask_diffusion(_ids(2, 5, seed=13), max_new_tokens=8, block_size=4,
                                        steps_per_block=4)
    assert out.shape == (2, 13) and not (out[:, 5:] == MASK).any()
    assert 2 <= model._last_nfe <= 8
