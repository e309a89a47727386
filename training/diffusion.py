"""Block-wise masked diffusion: noise schedules, time sampling, masking and the NELBO loss.

Stage: between the data loader and the TwoTower forward. Inputs: clean tokens
``x0 [b, L]``. Outputs: the noisy input ``xt``, the per-block times ``t [b, L/S]``, the
mask, and, after the model's per-token cross-entropy, the loss.

Masked diffusion (MDLM, Sahoo et al. 2024; block-wise: BD3-LM, Arriola et al. 2025). A
token survives to time t with probability ``alpha(t)``; otherwise it becomes [MASK]:

    move_chance(t) = 1 - alpha(t)          log-linear: alpha = 1 - t   -> move_chance = t
                                           cosine:     alpha = cos(pi t / 2)

The continuous-time NELBO per block (MDLM eq. 10, BD3-LM eq. 8)::

    L_b = E_{t ~ U[0,1]} [ w(t) * sum_{i in block b, xt_i = MASK} -log p_theta(x0_i | xt_b, x0_<b) ]
    w(t) = -alpha'(t) / (1 - alpha(t))      (= 1/t for log-linear)

SUBS parameterisation: the model never predicts [MASK] and unmasked positions carry no
loss. The estimator is normalised by the number of tokens, so it is an upper bound on the
NLL per token, comparable with the AR tower's NLL on the same tokens.

Variance reduction: one time per block, stratified (antithetic) over all K blocks of the
*global* batch, ``t_k = ((u + k) / K) mod 1`` with one shared ``u`` per step, then mapped
into the clip interval ``[beta, omega]`` (BD3-LM's clipped schedules).

The release's recipe (``conf/diffusion/release.yaml``, spec release.md §11) is the special case
``time_per=sequence`` (one t per sequence, t = eps + (1 - eps) U[0, 1), fed to adaLN as sampled
for every block), no stratification, no forced masks, and ``loss_weighting=masked_mean``:
cross-entropy at the masked tokens averaged over the micro-batch's masked tokens, no 1/t.
Validation always reports the unbiased NELBO, so runs of either recipe compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from twotower.model.config import ConfigError

LOSS_WEIGHTINGS = ("nelbo", "unweighted", "masked_mean")


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"
    """Noise schedule alpha(t)."""
    t_min: float = 0.0
    """beta: lower end of the clip interval of training times."""
    t_max: float = 1.0
    """omega: upper end of the clip interval."""
    eps: float = 1e-3
    """Floor of t (w(t) = 1/t diverges at 0); applies to training and validation."""
    loss_weighting: str = "nelbo"
    """``nelbo``: w(t)-weighted, normalised by all tokens (the MDLM/BD3-LM bound); ``unweighted``:
    masked cross-entropy normalised by all tokens (E2D2); ``masked_mean``: masked cross-entropy
    averaged over the micro-batch's masked tokens (the release)."""
    time_per: str = "block"
    """``block``: one time per block (BD3-LM); ``sequence``: one per sequence, shared by all its
    blocks (the release)."""
    antithetic: bool = True
    """Stratify the block times over the global batch (lower-variance gradients)."""
    min_masked_per_block: int = 1
    """Mask at least this many tokens in every training block (0 disables; validation never forces)."""

    def __post_init__(self) -> None:
        if self.schedule not in ("loglinear", "cosine"):
            raise ConfigError(f"diffusion.schedule={self.schedule!r}: use 'loglinear' or 'cosine'")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"diffusion.loss_weighting={self.loss_weighting!r}: use one of "
                              f"{', '.join(LOSS_WEIGHTINGS)}")
        if self.time_per not in ("block", "sequence"):
            raise ConfigError(f"diffusion.time_per={self.time_per!r}: use 'block' or 'sequence'")
        for name in ("t_min", "t_max", "eps"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"diffusion.{name}={v} is outside [0, 1]")
        if self.t_min >= self.t_max:
            raise ConfigError(f"diffusion.t_min={self.t_min} must be below diffusion.t_max={self.t_max}")
        if self.min_masked_per_block < 0:
            raise ConfigError("diffusion.min_masked_per_block must be >= 0")


class NoiseSchedule:
    """alpha(t), the mask probability and the NELBO weight for one schedule."""

    def __init__(self, kind: str = "loglinear"):
        if kind not in ("loglinear", "cosine"):
            raise ConfigError(f"diffusion.schedule={kind!r}: use 'loglinear' or 'cosine'")
        self.kind = kind

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t if self.kind == "loglinear" else torch.cos(math.pi / 2 * t)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t."""
        return 1 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """``-alpha'(t) / (1 - alpha(t))``: 1/t (log-linear), (pi/2) sin / (1 - cos) (cosine)."""
        if self.kind == "loglinear":
            return 1 / t
        a = math.pi / 2 * t
        return (math.pi / 2) * torch.sin(a) / (1 - torch.cos(a))


def per_token(t: torch.Tensor, length: int) -> torch.Tensor:
    """Times ``[b, n_t]`` (one per sequence or per block) -> ``[b, length]``."""
    return t.repeat_interleave(length // t.shape[1], dim=1)


def sample_block_times(n_local: int, *, start: int, total: int, generator: torch.Generator,
                       cfg: DiffusionConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Times of ``n_local`` draws that are draws ``[start, start + n_local)`` of the ``total``
    in the global batch (one draw per block, or per sequence with ``time_per=sequence``).

    ``generator`` must be seeded identically on every rank for the step (it draws the shared
    offset ``u`` and the stratum permutation), so the strata are a partition of [0, 1) over
    the global batch. Returns fp32 ``[n_local]`` in ``[max(t_min, eps), t_max]``.
    """
    if cfg.antithetic:
        u = torch.rand((), generator=generator)
        perm = torch.randperm(total, generator=generator)[start:start + n_local]
        t = torch.remainder((u + perm.float()) / total, 1.0)
    else:
        t = torch.rand(total, generator=generator)[start:start + n_local]
    lo = max(cfg.t_min, cfg.eps)  # uniform on [lo, t_max]: no point mass at the floor
    return (lo + (cfg.t_max - lo) * t).to(device)


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, block_size: int, mask_token_id: int,
                schedule: NoiseSchedule, generator: torch.Generator | None = None,
                min_masked_per_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process q(xt | x0), independently per token with the block's move chance.

    Args:
        x0: ``[b, L]``; t: ``[b, L/S]`` (per block) or ``[b, 1]`` (per sequence).
    Returns:
        ``(xt [b, L], masked [b, L] bool)``.
    """
    b, L = x0.shape
    nb = L // block_size
    p = per_token(schedule.move_chance(t), L)  # [b, L]
    u = torch.rand(b, L, generator=generator, device="cpu").to(x0.device)
    masked = u < p
    if min_masked_per_block:
        # Force the k most likely-to-be-masked (smallest u) positions of each block: a uniform
        # choice among the block's positions that keeps already-masked ones masked.
        k = min(min_masked_per_block, block_size)
        ub = u.view(b, nb, block_size)
        kth = ub.topk(k, dim=-1, largest=False).values[..., -1:]  # [b, nb, 1]
        masked = masked | (ub <= kth).view(b, L)
    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return xt, masked


@dataclass
class LossOutput:
    loss: torch.Tensor
    """The micro-batch's objective (what is differentiated): ``loss_sum / num_tokens``, or for
    ``masked_mean`` the masked CE over the masked tokens."""
    loss_sum: torch.Tensor
    """Sum over this micro-batch of the weighted masked CE (the NELBO numerator)."""
    num_tokens: int
    """Tokens in this micro-batch (all positions, masked or not)."""
    num_masked: torch.Tensor
    """Masked tokens in this micro-batch."""
    masked_ce_sum: torch.Tensor
    """Unweighted CE summed over masked tokens (for logging)."""


def diffusion_loss(ce: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, block_size: int,
                   schedule: NoiseSchedule, weighting: str = "nelbo") -> LossOutput:
    """``ce [b, L]`` per-token CE of x0 under the denoiser, ``masked [b, L]``, ``t [b, L/S]`` or ``[b, 1]``."""
    m = masked.to(ce.dtype)
    masked_ce = ce * m
    if weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"diffusion.loss_weighting={weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}")
    if weighting == "nelbo":
        loss_sum = (masked_ce * per_token(schedule.weight(t.to(ce.dtype)), ce.shape[1])).sum()
    else:
        loss_sum = masked_ce.sum()
    num_masked = m.sum()
    # masked_mean: a micro-batch without masked tokens contributes 0 (no host sync to test it)
    loss = loss_sum / num_masked.clamp(min=1) if weighting == "masked_mean" else loss_sum / ce.numel()
    return LossOutput(loss, loss_sum, ce.numel(), num_masked.detach(), masked_ce.sum().detach())


@dataclass
class ValidationStats:
    """Accumulates the unbiased NELBO and the context tower's AR NLL over validation batches."""

    nelbo_sum: float = 0.0
    nelbo_tokens: int = 0
    ar_nll_sum: float = 0.0
    ar_tokens: int = 0

    def add(self, loss: LossOutput, ar_nll: torch.Tensor | None = None) -> None:
        self.nelbo_sum += float(loss.loss_sum)
        self.nelbo_tokens += loss.num_tokens
        if ar_nll is not None:
            self.ar_nll_sum += float(ar_nll.sum())
            self.ar_tokens += ar_nll.numel()

    def all_reduce(self, group=None, device: torch.device | str = "cpu") -> ValidationStats:
        """Sum over ``group``; ``device`` must be the group's (the compute device under NCCL)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            v = torch.tensor([self.nelbo_sum, self.nelbo_tokens, self.ar_nll_sum, self.ar_tokens],
                             dtype=torch.float64, device=device)
            torch.distributed.all_reduce(v, group=group)
            return ValidationStats(float(v[0]), int(v[1]), float(v[2]), int(v[3]))
        return self

    def summary(self) -> dict[str, float]:
        nelbo = self.nelbo_sum / max(self.nelbo_tokens, 1)
        out = {"val/nelbo": nelbo, "val/bits_per_token": nelbo / math.log(2), "val/ppl_bound": math.exp(nelbo)}
        if self.ar_tokens:
            ar = self.ar_nll_sum / self.ar_tokens
            out |= {"val/ar_nll": ar, "val/ar_bits_per_token": ar / math.log(2), "val/ar_ppl": math.exp(ar)}
        return out


def validation_config(cfg: DiffusionConfig) -> DiffusionConfig:
    """The unbiased evaluation setting: t ~ U[eps, 1], NELBO weights, no forced masks."""
    return DiffusionConfig(schedule=cfg.schedule, t_min=0.0, t_max=1.0, eps=cfg.eps, loss_weighting="nelbo",
                           antithetic=True, min_masked_per_block=0, time_per="block")
