"""Optimizer and learning-rate schedule: megatron-core's, configured from ``OptimConfig``.

Stage: after the model is wrapped in megatron DDP. Input: the DDP model chunks. Output: a
``MegatronOptimizer`` (AdamW; the distributed optimizer shards its state over DP ranks)
and an ``OptimizerParamScheduler`` stepped once per optimizer step.

Only parameters with ``requires_grad`` reach the optimizer: the frozen context tower has
no optimizer state and no slot in DDP's gradient buffers. Norm weights, biases and other
1-D parameters get no weight decay (megatron's default parameter groups).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from twotower.training.config import OptimConfig


def build_optimizer(cfg: OptimConfig, model_chunks: list, params_dtype: torch.dtype):
    oc = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=cfg.eps,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.distributed_optimizer,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
    )
    return get_megatron_optimizer(oc, model_chunks)


def build_scheduler(cfg: OptimConfig, optimizer, max_steps: int) -> OptimizerParamScheduler:
    """Linear warmup from 0, then cosine to ``min_lr``, warmup-stable-decay, or constant."""
    decay = cfg.decay_steps or max_steps
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[cfg.schedule]
    kwargs = {}
    if cfg.schedule == "wsd":
        kwargs = dict(wsd_decay_steps=max(1, int(cfg.wsd_decay_fraction * decay)), lr_wsd_decay_style="linear")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(decay, cfg.warmup_steps + 1),
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
        # On resume the configured schedule wins over the checkpoint's (a user who raises
        # trainer.max_steps wants the decay stretched); the step count comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        **kwargs,
    )
