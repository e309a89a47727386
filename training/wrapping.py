"""megatron's training wrappers around the model: ``Float16Module`` and ``DistributedDataParallel``.

Stage: between the model build and the optimizer. Input: this stage's model (built on the compute
device in ``params_dtype``), the config. Output: the DDP-wrapped module the pipeline schedules
call, and its ``DistributedDataParallelConfig``.

* bf16: megatron's ``Float16Module`` (casts first-stage float inputs to bf16, last-stage outputs to
  fp32), not a bare ``model.to(dtype)``;
* gradients accumulate into fp32 ``main_grad`` buffers and are reduced in fp32;
* on CUDA the gradient reduce(-scatter) overlaps the backward (``parallel.overlap_grad_reduce``) and,
  with the distributed optimizer, the parameter all-gather overlaps the next forward
  (``parallel.overlap_param_gather``); both off on CPU (gloo, no streams to overlap on).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module


def wrap_for_training(model, cfg, device: torch.device, dtype: torch.dtype
                      ) -> tuple[DistributedDataParallel, DistributedDataParallelConfig]:
    """``(ddp, ddp_config)`` for ``model`` under ``cfg`` (a ``TrainConfig``)."""
    cuda = device.type == "cuda"
    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cuda and p.overlap_grad_reduce,
        overlap_param_gather=(cuda and p.overlap_param_gather and p.overlap_grad_reduce
                              and cfg.optim.distributed_optimizer),
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
    )
    module = Float16Module(model.config, model) if dtype != torch.float32 else model
    return DistributedDataParallel(model.config, ddp_config, module), ddp_config


@contextlib.contextmanager
def params_gathered(ddp: DistributedDataParallel, ddp_config: DistributedDataParallelConfig):
    """Parameters all-gathered (checkpoint save, validation). With ``overlap_param_gather`` the
    all-gather after an optimizer step waits for the next forward; megatron's own rule is to
    disable the forward pre-hook (which forces the gather) around checkpointing and evaluation."""
    if not ddp_config.overlap_param_gather:
        yield
        return
    ddp.disable_forward_pre_hook()
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def release_training_wrappers(model, ddp: DistributedDataParallel) -> None:
    """Let a finished run's model, gradients, optimizer and process groups be freed in-process
    (a Hydra ``--multirun`` sweep runs many trainers in one process).

    Megatron's DDP keeps each parameter's grad-accumulator node in ``ddp.grad_accs``; the node's
    hook (C++-held) points back at the DDP, and the distributed optimizer's shard views (autograd
    views of the parameters) lead to the same nodes. Python's collector cannot see those C++
    edges, so the cycle DDP -> node -> hook -> DDP (and the model config's bound optimizer and
    DDP methods) kept every run alive: its tensors and ~65 gloo sockets/pipes per run. Dropping
    the node references and the config's callbacks breaks it; the model cannot train afterwards."""
    mc = model.config
    mc.finalize_model_grads_func = mc.no_sync_func = mc.grad_scale_func = None
    ddp.grad_accs.clear()
