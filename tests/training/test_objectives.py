"""Loss functions of the forward steps: statistics stay tensors on the loss's device (read once
per step by reduce_stats), and a non-finite micro-batch is flagged with its sums zeroed."""

from __future__ import annotations

import math

import torch

from twotower.training.batches import MicroBatch
from twotower.training.diffusion import NoiseSchedule
from twotower.training.objectives import STAT_KEYS, _ar_loss, _diffusion_loss, reduce_stats


def _mb(masked):
    x0 = torch.zeros(masked.shape, dtype=torch.long)
    return MicroBatch(x0, 0, xt=x0, t=torch.full((masked.shape[0], 1), 0.5), masked=masked)


def test_diffusion_stats_are_device_tensors_and_nonfinite_is_flagged():
    masked = torch.tensor([[True, False, True, True]])
    ce = torch.tensor([[1.0, 5.0, 2.0, 3.0]])
    loss, stats = _diffusion_loss(_mb(masked), NoiseSchedule(), "masked_mean", 2, None, ce)
    assert set(stats) == set(STAT_KEYS)
    assert all(isinstance(v, torch.Tensor) and v.device == loss.device and v.dim() == 0 for v in stats.values())
    assert float(loss) == 2.0 and float(stats["objective_sum"]) == 2.0 and float(stats["nonfinite"]) == 0
    bad_loss, bad = _diffusion_loss(_mb(masked), NoiseSchedule(), "masked_mean", 2, None,
                                    torch.tensor([[1.0, 5.0, float("nan"), 3.0]]))
    assert math.isnan(float(bad_loss))
    assert float(bad["nonfinite"]) == 1 and float(bad["loss_sum"]) == 0 and float(bad["objective_sum"]) == 0
    assert float(bad["tokens"]) == 4  # counts stay: the step is skipped, not mis-normalised
    totals = reduce_stats([stats, bad], groups=[])
    assert totals["nonfinite"] == 1 and totals["micro_batches"] == 2 and totals["objective_sum"] == 2.0


def test_ar_stats_sum_over_micro_batches():
    a = _ar_loss(torch.tensor([[1.0, 2.0, 9.0]]))[1]  # the last position (wrapped label) is dropped
    b = _ar_loss(torch.tensor([[3.0, 4.0, 9.0]]))[1]
    totals = reduce_stats([a, b], groups=[])
    assert totals["loss_sum"] == 10.0 and totals["tokens"] == 4 and totals["objective_sum"] == 1.5 + 3.5
