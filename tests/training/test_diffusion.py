"""The noising process and the NELBO estimator (training/diffusion.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twotower.model.config import ConfigError
from twotower.training.diffusion import (
    DiffusionConfig,
    NoiseSchedule,
    ValidationStats,
    diffusion_loss,
    mask_tokens,
    sample_block_times,
    validation_config,
)


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_mask_rate_per_block_follows_schedule(kind):
    sched = NoiseSchedule(kind)
    S, nb, b = 16, 6, 2000
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95]).expand(b, nb)
    x0 = torch.randint(4, 100, (b, nb * S))
    xt, masked = mask_tokens(x0, t, S, 3, sched, torch.Generator().manual_seed(0))
    rate = masked.view(b, nb, S).float().mean(dim=(0, 2))
    expect = sched.move_chance(t[0])
    # binomial std of a rate over b*S = 32000 draws is <= 0.0028
    assert (rate - expect).abs().max() < 0.012
    assert torch.equal(xt[masked], torch.full_like(xt[masked], 3)) and torch.equal(xt[~masked], x0[~masked])


def test_at_least_one_mask_per_block_even_at_tiny_t():
    S, nb, b = 16, 4, 500
    t = torch.full((b, nb), 1e-4)
    _, masked = mask_tokens(torch.randint(4, 50, (b, nb * S)), t, S, 3, NoiseSchedule(),
                            torch.Generator().manual_seed(1), min_masked_per_block=1)
    per_block = masked.view(b, nb, S).sum(-1)
    assert per_block.min() >= 1
    assert per_block.float().mean() < 1.05  # forcing adds ~one mask, not more
    # the forced position is uniform over the block
    pos = masked.view(b, nb, S).float().mean(dim=(0, 1))
    assert pos.min() > 0.03 and pos.max() < 0.10


def test_stratified_times_partition_the_interval_across_ranks():
    cfg = DiffusionConfig(t_min=0.3, t_max=0.8, eps=1e-3)
    K, parts = 24, [(0, 10), (10, 6), (16, 8)]  # e.g. three ranks / micro-batches
    ts = torch.cat([sample_block_times(n, start=s, total=K, generator=torch.Generator().manual_seed(7), cfg=cfg)
                    for s, n in parts])
    u = ((ts - 0.3) / 0.5).sort().values
    gaps = u[1:] - u[:-1]
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / K), atol=1e-5)  # one time per stratum
    assert ts.min() >= 0.3 and ts.max() <= 0.8
    # the shared offset and permutation change with the step's seed
    other = sample_block_times(K, start=0, total=K, generator=torch.Generator().manual_seed(8), cfg=cfg)
    assert not torch.allclose(other.sort().values, ts.sort().values)


def _toy_ce(masked: torch.Tensor, S: int, a=2.0, c=1.5) -> torch.Tensor:
    """A stand-in denoiser: a masked token's CE grows with the number m of masks in its block."""
    m = masked.view(masked.shape[0], -1, S).sum(-1, keepdim=True).float()
    ce = a + c * (m - 1).clamp(min=0) / (S - 1)
    return ce.expand(-1, -1, S).reshape(masked.shape) * masked


def _nelbo_by_quadrature(kind: str, S: int, eps: float, a=2.0, c=1.5) -> float:
    """E_{t~U[eps,1]} [ w(t) E_{m~Bin(S,p(t))} m (a + c (m-1)/(S-1)) ] / S, Gauss-Legendre in t."""
    sched = NoiseSchedule(kind)
    x, wq = np.polynomial.legendre.leggauss(400)
    t = torch.tensor(eps + (1 - eps) * (x + 1) / 2, dtype=torch.float64)
    p = sched.move_chance(t)
    m = torch.arange(S + 1, dtype=torch.float64)
    logpmf = (torch.lgamma(torch.tensor(S + 1.0)) - torch.lgamma(m + 1) - torch.lgamma(S - m + 1))[None]
    pmf = torch.exp(logpmf + m[None] * torch.log(p[:, None]) + (S - m)[None] * torch.log1p(-p[:, None]))
    f = (pmf * m * (a + c * (m - 1).clamp(min=0) / (S - 1))).sum(-1)
    integrand = (sched.weight(t) * f).numpy()
    return float((wq * integrand).sum() / 2) / S  # mean over [eps, 1] (interval length cancels)


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_nelbo_estimator_is_unbiased(kind):
    S, nb, b = 8, 4, 4096
    cfg = validation_config(DiffusionConfig(schedule=kind, eps=0.02))
    sched = NoiseSchedule(kind)
    g = torch.Generator().manual_seed(3)
    losses = []
    for step in range(6):
        t = sample_block_times(b * nb, start=0, total=b * nb, generator=torch.Generator().manual_seed(step),
                               cfg=cfg).view(b, nb)
        _, masked = mask_tokens(torch.zeros(b, nb * S, dtype=torch.long), t, S, 3, sched, g)
        out = diffusion_loss(_toy_ce(masked, S), masked, t, S, sched, "nelbo")
        losses.append(float(out.loss_sum) / out.num_tokens)
    est, sem = np.mean(losses), np.std(losses) / math.sqrt(len(losses))
    exact = _nelbo_by_quadrature(kind, S, eps=0.02)
    assert abs(est - exact) < max(4 * sem, 0.01 * exact), (est, exact, sem)


def test_loglinear_weight_is_one_over_t_and_unweighted_option():
    sched = NoiseSchedule("loglinear")
    t = torch.tensor([[0.25, 0.5]])
    ce = torch.ones(1, 4)
    masked = torch.tensor([[True, False, True, True]])
    nelbo = diffusion_loss(ce, masked, t, 2, sched, "nelbo")
    assert float(nelbo.loss_sum) == pytest.approx(1 / 0.25 + 2 / 0.5)
    assert nelbo.num_tokens == 4 and int(nelbo.num_masked) == 3
    assert float(diffusion_loss(ce, masked, t, 2, sched, "unweighted").loss_sum) == pytest.approx(3.0)
    cos = NoiseSchedule("cosine")
    tt = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    alpha = torch.cos(math.pi / 2 * tt)
    (d_alpha,) = torch.autograd.grad(alpha, tt)
    assert float(cos.weight(tt.detach())) == pytest.approx(float(-d_alpha / (1 - alpha.detach())))


def test_validation_summary_in_bits_and_perplexity():
    stats = ValidationStats()
    stats.add(diffusion_loss(torch.full((1, 4), math.log(2)), torch.ones(1, 4, dtype=torch.bool),
                             torch.ones(1, 1), 4, NoiseSchedule(), "nelbo"), ar_nll=torch.full((1, 3), 1.0))
    s = stats.summary()
    assert s["val/bits_per_token"] == pytest.approx(1.0) and s["val/ppl_bound"] == pytest.approx(2.0)
    assert s["val/ar_nll"] == pytest.approx(1.0) and s["val/ar_ppl"] == pytest.approx(math.e)


@pytest.mark.parametrize("kw,msg", [
    (dict(t_min=-0.1), r"diffusion.t_min=-0.1 is outside \[0, 1\]"),
    (dict(t_max=1.5), r"diffusion.t_max=1.5 is outside \[0, 1\]"),
    (dict(t_min=0.6, t_max=0.4), "must be below"),
    (dict(schedule="linear"), "diffusion.schedule='linear'"),
    (dict(loss_weighting="elbo"), "diffusion.loss_weighting='elbo': use one of nelbo, unweighted, masked_mean"),
    (dict(time_per="token"), "diffusion.time_per='token': use 'block' or 'sequence'"),
])
def test_bad_diffusion_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        DiffusionConfig(**kw)


# ---------------------------------------------------------------- the release's recipe (spec §11)
def _release_cfg():
    return DiffusionConfig(schedule="loglinear", eps=1e-3, loss_weighting="masked_mean", antithetic=False,
                           min_masked_per_block=0, time_per="sequence")


def test_release_recipe_one_time_per_sequence_uniform_above_eps():
    from twotower.training.batches import MicroBatch, add_noise
    from twotower.training.config import BatchPlan

    cfg, S, L, G = _release_cfg(), 4, 32, 4096
    plan = BatchPlan.derive(G, G, 1)
    x0 = torch.randint(4, 50, (G, L), generator=torch.Generator().manual_seed(0))
    mb = add_noise(MicroBatch(x0, first_index=0), 0, plan, cfg, S, 3, seed=1, schedule=NoiseSchedule())
    assert mb.t.shape == (G, 1)  # every block of a sequence shares (and feeds adaLN) this t
    t = mb.t[:, 0].double()
    assert t.min() >= 1e-3 and t.max() < 1.0
    # t = eps + (1 - eps) U[0, 1): the standardised values are uniform (KS distance)
    u = ((t - 1e-3) / (1 - 1e-3)).sort().values.numpy()
    ks = np.abs(u - (np.arange(1, G + 1) - 0.5) / G).max()
    assert ks < 1.6 / math.sqrt(G)
    # each token masked independently with probability t (no forced minimum): per-sequence rates
    rate = mb.masked.double().mean(1)
    z = (rate - t) / torch.sqrt(t * (1 - t) / L).clamp(min=1e-6)
    assert abs(float(z.mean())) < 0.1 and 0.85 < float(z.std()) < 1.15
    assert int((mb.masked.view(G, L // S, S).sum(-1) == 0).sum()) > 0  # blocks without masks exist
    assert torch.equal(mb.xt[mb.masked], torch.full_like(mb.xt[mb.masked], 3))


def test_release_loss_is_the_masked_mean_without_time_weight():
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]])
    t = torch.tensor([[0.5], [0.1]])  # one t per sequence: no 1/t weight may enter
    out = diffusion_loss(ce, masked, t, 2, NoiseSchedule(), "masked_mean")
    assert float(out.loss) == pytest.approx((1.0 + 3.0 + 8.0) / 3)
    assert float(out.num_masked) == 3 and out.num_tokens == 8
    none = diffusion_loss(ce, torch.zeros_like(masked), t, 2, NoiseSchedule(), "masked_mean")
    assert float(none.loss) == 0.0  # a micro-batch without masks contributes nothing (no NaN)
    # the NELBO with one t per sequence weights every block of a row by that row's 1/t
    nelbo = diffusion_loss(ce, masked, t, 2, NoiseSchedule(), "nelbo")
    assert float(nelbo.loss) == pytest.approx(((1.0 + 3.0) / 0.5 + 8.0 / 0.1) / 8)
