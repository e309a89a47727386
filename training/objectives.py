"""Forward-step functions for megatron-core's pipeline schedules: diffusion and AR.

Stage: inside ``forward_backward_func`` (megatron's 1F1B or no-pipelining schedule), once
per micro-batch. Input: an iterator of ``MicroBatch`` and the (DDP-wrapped) model.
Output: ``(output_tensor, loss_func)``; on the last pipeline stage ``loss_func`` turns the
per-token cross-entropy into the micro-batch loss and the sums that are logged.

Loss normalisation: ``loss_func`` returns the micro-batch's objective (the mean over its
tokens; for the release's ``masked_mean``, over its masked tokens); the schedule divides by
the number of micro-batches and DDP averages over data-parallel ranks, so the step's gradient
is that of the mean of the micro-batch objectives over the global batch (as megatron trains the
release). ``objective_sum / micro_batches`` is the logged loss.
"""

from __future__ import annotations

from functools import partial

import torch

from twotower.training.batches import MicroBatch
from twotower.training.diffusion import NoiseSchedule, diffusion_loss

#: Keys of the per-micro-batch sums every loss_func reports (a fixed order for all-reduces).
STAT_KEYS = ("loss_sum", "tokens", "masked", "masked_ce_sum", "ar_nll_sum", "ar_tokens", "nonfinite",
             "objective_sum", "micro_batches")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _stats(device: torch.device, finite: torch.Tensor, **values) -> dict[str, torch.Tensor]:
    """The micro-batch's sums as 0-d fp64 tensors on the compute device (no host sync: they are
    read once per step, after the schedule, by :func:`reduce_stats`). Sums of a non-finite
    micro-batch count as 0 and set ``nonfinite``."""
    out = {}
    for k in STAT_KEYS:
        v = torch.as_tensor(values.get(k, 0.0), dtype=torch.float64, device=device).detach().reshape(())
        out[k] = torch.where(finite, v, torch.zeros_like(v)) if k in _MASKED_IF_NONFINITE else v
    out["nonfinite"] = (~finite).to(torch.float64)
    return out


_MASKED_IF_NONFINITE = ("loss_sum", "masked_ce_sum", "ar_nll_sum", "objective_sum")


def diffusion_forward_step(data_iterator, model, *, schedule: NoiseSchedule, weighting: str,
                           block_size: int, ar_nll: bool = False):
    mb: MicroBatch = next(data_iterator)
    inner = _unwrap(model)
    out = model(mb.x0, mb.xt, mb.t, ar_nll=ar_nll and inner.post_process)
    if not inner.post_process:
        return out, None
    return out.ce, partial(_diffusion_loss, mb, schedule, weighting, block_size, out.ar_nll)


def _diffusion_loss(mb: MicroBatch, schedule, weighting, block_size, ar_nll, ce: torch.Tensor):
    res = diffusion_loss(ce, mb.masked, mb.t, block_size, schedule, weighting)
    loss = res.loss
    stats = _stats(loss.device, torch.isfinite(loss), loss_sum=res.loss_sum, tokens=res.num_tokens,
                   masked=res.num_masked, masked_ce_sum=res.masked_ce_sum,
                   ar_nll_sum=ar_nll.sum() if ar_nll is not None else 0.0,
                   ar_tokens=ar_nll.numel() if ar_nll is not None else 0, objective_sum=loss, micro_batches=1)
    return loss, stats


def ar_forward_step(data_iterator, model):
    mb: MicroBatch = next(data_iterator)
    inner = _unwrap(model)
    # Feed all L tokens (SP and the pipeline's tensor shape need L) and drop the last
    # position's loss: its label would wrap around.
    ids, labels = mb.x0, torch.roll(mb.x0, shifts=-1, dims=1)
    out = model(ids, labels=labels) if inner.post_process else model(ids)
    if not inner.post_process:
        return out, None
    return out, _ar_loss


def _ar_loss(per_token: torch.Tensor):
    per_token = per_token[:, :-1]
    loss = per_token.mean()
    s = per_token.sum()
    return loss, _stats(loss.device, torch.isfinite(loss), loss_sum=s, tokens=per_token.numel(), ar_nll_sum=s,
                        ar_tokens=per_token.numel(), objective_sum=loss, micro_batches=1)


def reduce_stats(per_micro: list[dict[str, torch.Tensor]], groups: list,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Sum the micro-batch stats, then over the given process groups (PP: only the last stage
    has them; DP: each rank saw different samples). Every rank returns the same totals.

    Everything stays on ``device`` (the compute device: NCCL reduces only device tensors) until
    the single host read at the end, once per step. ``device`` defaults to the stats' own (the
    current CUDA device on stages without a loss)."""
    if device is None:
        device = (per_micro[0]["tokens"].device if per_micro
                  else torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    total = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)
    for d in per_micro:
        total += torch.stack([d[k] for k in STAT_KEYS]).to(device)
    if torch.distributed.is_initialized():
        for g in groups:
            if g is not None and torch.distributed.get_world_size(g) > 1:
                torch.distributed.all_reduce(total, group=g)
    return dict(zip(STAT_KEYS, total.tolist()))
