"""Micro-batches of a step, with noise and masks that do not depend on the parallel layout.

Stage: between the data loader and the forward step. Input: token micro-batches
``[mbs, L]`` of this data-parallel rank (from ``twotower.data`` or a synthetic source).
Output: per micro-batch the clean tokens plus, for the diffusion objective, the times
``t [mbs, L/S]`` (per block) or ``[mbs, 1]`` (per sequence), the mask and ``xt``.

Layout independence (what makes TP/PP/DP runs reproduce the single-rank loss curve):
micro-batch ``m`` of DP rank ``r`` at step ``k`` holds the global samples
``k*G + (m*dp + r)*mbs + [0, mbs)``; block times are stratified over the step's global
batch with one generator seeded by ``(seed, k)``; a sample's mask is drawn from a
generator seeded by ``(seed, k, global sample index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.training.config import BatchPlan
from twotower.training.diffusion import DiffusionConfig, NoiseSchedule, mask_tokens, sample_block_times


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return h


@dataclass
class MicroBatch:
    x0: torch.Tensor
    """``[mbs, L]`` int64 clean tokens."""
    first_index: int
    """Global index of the first sample (for layout-independent noise)."""
    xt: torch.Tensor | None = None
    t: torch.Tensor | None = None
    masked: torch.Tensor | None = None


def first_sample_index(step: int, micro: int, dp_rank: int, plan: BatchPlan) -> int:
    return step * plan.global_batch_size + (micro * plan.dp + dp_rank) * plan.micro_batch_size


def add_noise(mb: MicroBatch, step: int, plan: BatchPlan, cfg: DiffusionConfig, block_size: int,
              mask_token_id: int, seed: int, schedule: NoiseSchedule) -> MicroBatch:
    """Fill ``t``, ``masked`` and ``xt`` of a micro-batch (the forward process q(xt | x0))."""
    b, L = mb.x0.shape
    n_t = 1 if cfg.time_per == "sequence" else L // block_size  # times per sequence
    in_step = mb.first_index - step * plan.global_batch_size  # position inside the step's global batch
    if not 0 <= in_step <= plan.global_batch_size - b:
        raise ValueError(f"micro-batch at global sample {mb.first_index} is not part of step {step} "
                         f"(global batch {plan.global_batch_size})")
    t = sample_block_times(b * n_t, start=in_step * n_t, total=plan.global_batch_size * n_t,
                           generator=torch.Generator().manual_seed(_seed(seed, step)), cfg=cfg).view(b, n_t)
    rows = [mask_tokens(mb.x0[i:i + 1], t[i:i + 1], block_size, mask_token_id, schedule,
                        torch.Generator().manual_seed(_seed(seed, step, mb.first_index + i)),
                        cfg.min_masked_per_block) for i in range(b)]
    mb.t = t.to(mb.x0.device)
    mb.xt = torch.cat([r[0] for r in rows])
    mb.masked = torch.cat([r[1] for r in rows])
    return mb


class SyntheticTokens:
    """Deterministic, learnable token sequences keyed by global sample index (tests, smoke runs).

    Sample ``i`` is an arithmetic progression ``(a*j + c) mod A + 4`` over a small alphabet of
    ``A = min(16, V - 4)`` token ids, with ``a, c`` drawn from ``(seed, i)``: predictable from two
    tokens of context, and every id recurs in every batch, so a tiny model's losses fall
    within a few dozen steps (a 256-id alphabet would need thousands of samples per id).
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, alphabet: int = 16):
        self.vocab, self.L, self.seed = vocab_size, seq_len, seed
        self.alphabet = min(alphabet, vocab_size - 4)

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, index))
        a = int(torch.randint(1, 4, (), generator=g))
        c = int(torch.randint(0, self.alphabet, (), generator=g))
        return (a * torch.arange(self.L) + c) % self.alphabet + 4

    def micro_batch(self, first_index: int, size: int) -> torch.Tensor:
        return torch.stack([self.sample(first_index + i) for i in range(size)])
