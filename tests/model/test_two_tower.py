"""TwoTower: the vectorised pass equals the naive block loop; a fresh denoiser is the backbone."""

from __future__ import annotations

import pytest
import torch
from naive_block_loop import naive

from twotower.model.config import BackboneConfig, ConfigError, ParallelConfig
from twotower.model.two_tower import TwoTowerConfig, build_two_tower

PAR = ParallelConfig(attention_backend="sdpa", ssm_backend="torch")
MASK = 3


def randomise_adaln(model, seed=0):
    """Give the time conditioning non-trivial weights (the release's random init, stronger tables)."""
    from twotower.model.adaln import reset_time_conditioning

    reset_time_conditioning(model.t_embedder, model.t_block, model.scale_shift_tables, "release", seed)
    with torch.no_grad():
        for table in model.scale_shift_tables.values():
            table.mul_(4.0)


def tiny(pattern="M*EM-*", block_size=4, recompute="mamba", seed=0, **kw):
    cfg = BackboneConfig(pattern=pattern, vocab_size=64, hidden_size=32, num_attention_heads=4,
                         num_query_groups=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                         mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=8, ffn_hidden_size=48,
                         num_experts=4, moe_topk=2, moe_ffn_hidden_size=16,
                         moe_shared_expert_intermediate_size=24, **kw)
    torch.manual_seed(seed)
    model = build_two_tower(cfg, PAR, TwoTowerConfig(block_size=block_size, mask_token_id=MASK,
                                                     recompute=recompute))
    # A trained denoiser differs from the context tower: perturb it so the test sees both.
    with torch.no_grad():
        for p in model.denoiser_tower.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    randomise_adaln(model, seed)
    return cfg, model


def batch(cfg, b, L, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(4, cfg.vocab_size, (b, L), generator=g)
    t = torch.rand(b, L // S, generator=g) * 0.9 + 0.05
    masked = torch.rand(b, L, generator=g) < t.repeat_interleave(S, 1)
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    return x0, xt, t, masked


def ce_of(logits, x0):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(x0.shape)


@pytest.mark.parametrize("pattern,S,L", [("M*EM-*", 4, 16), ("M*EM-*", 8, 24), ("*M-ME", 1, 6),
                                         ("MEM*", 16, 32)])
def test_vectorised_equals_naive_block_loop(megatron_world1, pattern, S, L):
    cfg, model = tiny(pattern, S)
    x0, xt, t, _masked = batch(cfg, 2, L, S)
    fast = model(x0, xt, t, return_logits=True)
    ref_logits = naive(model, x0, xt, t, S)
    finite = torch.isfinite(ref_logits)
    assert torch.equal(finite, torch.isfinite(fast.logits))
    assert (fast.logits[finite] - ref_logits[finite]).abs().max().item() <= 1e-4
    assert (fast.ce - ce_of(ref_logits, x0)).abs().max().item() <= 1e-4
    assert torch.isinf(fast.logits[..., MASK]).all() and (fast.logits[..., MASK] < 0).all()  # SUBS


@pytest.mark.parametrize("recompute", ["mamba", "none", "full"])
def test_vectorised_gradients_equal_naive(megatron_world1, recompute):
    cfg, model = tiny("M*EM-*", 4, recompute=recompute)
    x0, xt, t, masked = batch(cfg, 2, 16, 4, seed=1)
    w = torch.rand(x0.shape, generator=torch.Generator().manual_seed(5))  # arbitrary per-token weights

    model.zero_grad()
    (model(x0, xt, t).ce * masked * w).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (ce_of(naive(model, x0, xt, t, 4), x0) * masked * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert fast.keys() == ref.keys()
    time_net = ("t_embedder.", "t_block.", "scale_shift_tables.")
    assert all(n.startswith(("denoiser_tower.", *time_net)) for n in fast), "context tower got gradients"
    assert {p for p in time_net if any(n.startswith(p) for n in fast)} == set(time_net)
    worst = max((fast[n] - ref[n]).abs().max().item() for n in fast)
    assert worst <= 1e-4, worst


def test_fresh_denoiser_is_the_backbone(megatron_world1):
    """With no masks and S=1 (causal inside a 1-token block) an untrained denoiser's logits at
    every position equal the backbone's next-token logits; attention-free stacks for any S."""
    for pattern, S in (("M*EM-*", 1), ("MEM-M", 4)):
        cfg = BackboneConfig(pattern=pattern, vocab_size=64, hidden_size=32, head_dim=8, mamba_head_dim=8,
                             mamba_state_dim=8, mamba_chunk_size=8)
        torch.manual_seed(0)
        model = build_two_tower(cfg, PAR, TwoTowerConfig(block_size=S, mask_token_id=MASK))
        x0 = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        t = torch.rand(2, 8 // S)
        with torch.no_grad():
            den = model(x0, x0, t, return_logits=True).logits
            ar, _ = model.context_forward(x0, return_logits=True)
        keep = torch.ones(64, dtype=torch.bool)
        keep[MASK] = False  # SUBS removes the mask token from the denoiser's vocabulary
        assert (den[..., keep] - ar[..., keep]).abs().max().item() <= 1e-5, pattern


@pytest.mark.parametrize("symbol", ["M", "*", "E", "-"])
def test_modulation_order_per_layer_type(megatron_world1, symbol):
    """The release's order: M and * modulate the residual stream before the pre-norm, E and -
    modulate the normed input; the gate multiplies the mixer output as is (not 1 + gate)."""
    from twotower.model.adaln import Modulation

    _cfg, model = tiny(symbol, 4)
    layer = model.denoiser_tower.layers[0]
    seen = {}
    layer.mixer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out[0]))
    x = torch.randn(4, 2, 32)
    shift, scale, gate = torch.randn(3, 1, 2, 32).unbind(0)
    y, _ = layer(x, modulation=Modulation(shift, scale, gate))
    if symbol in "M*":
        expected_inp = layer.norm(x * (1 + scale) + shift)
    else:
        expected_inp = layer.norm(x) * (1 + scale) + shift
    assert torch.allclose(seen["inp"], expected_inp, atol=1e-6)
    assert torch.allclose(y, x + gate * seen["out"], atol=1e-6)


def test_time_conditioning_has_the_release_names_and_sizes():
    """Shapes of spec §3 at full scale: 30,022,272 parameters for h=2688 and 52 layers."""
    from twotower.model.adaln import build_time_conditioning

    t_embedder, t_block, tables = build_time_conditioning(2688, list(range(52)), device="meta")
    shapes = {f"t_embedder.{k}": tuple(v.shape) for k, v in t_embedder.state_dict().items()}
    shapes |= {f"t_block.{k}": tuple(v.shape) for k, v in t_block.state_dict().items()}
    assert shapes == {"t_embedder.mlp.0.weight": (2688, 256), "t_embedder.mlp.0.bias": (2688,),
                      "t_embedder.mlp.2.weight": (2688, 2688), "t_embedder.mlp.2.bias": (2688,),
                      "t_block.1.weight": (8064, 2688), "t_block.1.bias": (8064,)}
    assert sorted(tables.keys(), key=int) == [str(i) for i in range(52)] and tables["51"].shape == (3, 2688)
    n = sum(p.numel() for m in (t_embedder, t_block, tables) for p in m.parameters())
    assert n == 30_022_272


def test_identity_and_release_inits():
    from twotower.model.adaln import build_time_conditioning, layer_modulation, shared_modulation

    t = torch.rand(2, 3)
    mods = {}
    for init in ("identity", "release"):
        t_embedder, t_block, tables = build_time_conditioning(32, [0, 1, 5], init=init, seed=3)
        mods[init] = layer_modulation(shared_modulation(t_embedder, t_block, t, 12), tables["5"])
    ident = mods["identity"]
    assert ident.shift.abs().max() == 0 and ident.scale.abs().max() == 0 and (ident.gate == 1).all()
    rel = mods["release"]
    assert rel.shift.std() > 0.05 and not torch.allclose(rel.gate, torch.ones_like(rel.gate))
    # layout independence: the same weights whichever layers a pipeline stage builds
    _, _, a = build_time_conditioning(32, [5], init="release", seed=3)
    _, _, b = build_time_conditioning(32, [0, 1, 5], init="release", seed=3)
    assert torch.equal(a["5"], b["5"])
    with pytest.raises(ValueError, match="twotower.adaln_init='zero': use one of identity, release"):
        build_time_conditioning(32, [0], init="zero")


def test_time_embedding_precision_chain_in_bf16():
    """Spec §6.1: t is cast to bf16 and multiplied by 1000 in bf16 before the fp32 sinusoid."""
    import math

    from twotower.model.adaln import timestep_embedding

    k = torch.arange(16, 0, -1)
    emb = timestep_embedding(k / 16, torch.bfloat16)
    fed = torch.tensor([1000, 936, 876, 812, 752, 688, 624, 564, 500, 438, 376, 312, 250, 188, 125, 62.5])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(fed[:, None] * freqs), torch.sin(fed[:, None] * freqs)], -1).bfloat16()
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, expected)
    exact = (k / 16 * 1000.0)[:, None] * freqs
    assert not torch.equal(emb, torch.cat([exact.cos(), exact.sin()], -1).bfloat16())  # the chain matters


def test_one_step_leaves_context_tower_bit_identical(megatron_world1):
    cfg, model = tiny("M*E-", 4)
    before = {k: v.clone() for k, v in model.context_tower.state_dict().items() if "extra_state" not in k}
    den_before = {k: v.clone() for k, v in model.denoiser_tower.state_dict().items() if "extra_state" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x0, xt, t, masked = batch(cfg, 2, 16, 4)
    (model(x0, xt, t).ce * masked).sum().backward()
    opt.step()
    after = model.context_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in model.denoiser_tower.state_dict().items() if k in den_before
               and not torch.equal(v, den_before[k])]
    assert len(changed) > len(den_before) // 2
    assert all(not p.requires_grad for p in model.context_tower.parameters())


@pytest.mark.parametrize("kw,msg", [
    (dict(L=18), "sequence length 18 is not a multiple of twotower.block_size=4"),
    (dict(S=32), "twotower.block_size=32 is larger than the sequence length 16"),
])
def test_bad_shapes_are_named(megatron_world1, kw, msg):
    _cfg, model = tiny("M-", kw.get("S", 4))
    L = kw.get("L", 16)
    x0 = torch.randint(4, 64, (1, L))
    with pytest.raises(ConfigError, match=msg):
        model(x0, x0, torch.rand(1, max(L // kw.get("S", 4), 1)))


def test_mask_token_outside_vocab(megatron_world1):
    with pytest.raises(ConfigError, match="twotower.mask_token_id=64 is outside the vocabulary"):
        build_two_tower(BackboneConfig(pattern="M", vocab_size=64), PAR, TwoTowerConfig(mask_token_id=64))
