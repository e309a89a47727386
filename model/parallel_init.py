"""The distributed bootstrap: torch.distributed + megatron-core's model-parallel groups.

Stage: first thing an entry point does after validating its config. Inputs: the torchrun / srun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and the
layout (TP, EP, PP). Outputs: an initialised default process group (``nccl`` on CUDA, ``gloo`` on
a CPU-only host), megatron's parallel state and its CUDA RNG tracker seeded.

On a CPU-only host megatron needs the CPU runtime layer (:mod:`twotower.model.megatron_cpu`);
entry points apply it explicitly and :func:`init_parallel` applies it again (idempotent), so no
megatron world is ever built without it. Importing this module changes nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

__all__ = ["DEFAULT_TIMEOUT_S", "destroy_parallel", "free_port", "init_parallel"]

#: Collective timeout. NCCL's (and megatron's) 10 min is too short at 512 ranks: the first
#: collective waits for the slowest rank's imports + model build + checkpoint load, and a
#: distributed checkpoint save of 60 B parameters can hold ranks apart for minutes.
DEFAULT_TIMEOUT_S = 1800

_ENV_SET: dict[str, str | None] = {}  # env vars init_parallel() set (restored by destroy_parallel)


def init_parallel(tp: int = 1, ep: int = 1, pp: int = 1, seed: int = 1234,
                  timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed from the torchrun env and megatron model parallel.

    Backend ``gloo`` on a CPU-only host, ``nccl`` on CUDA (the CUDA device set from ``LOCAL_RANK``
    first, so every later ``torch.cuda.current_device()`` is this rank's GPU). Without torchrun
    env vars it falls back to a 1-process world on a free port. Then
    ``initialize_model_parallel(tp, pp, ep)`` and ``model_parallel_cuda_manual_seed(seed)``.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        from twotower.model import megatron_cpu

        megatron_cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # not under torchrun: a 1-process world on a fresh port
            env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
            env["MASTER_PORT"] = str(free_port())
            _ENV_SET.update({k: os.environ.get(k) for k in env})
            os.environ.update(env)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo",
                                             timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        # Experts are not tensor-parallel (Nemotron-H: ETP=1); must match TransformerConfig.
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=max(1, timeout_s // 60),
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo :func:`init_parallel` (megatron groups, then the default process group)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in _ENV_SET.items():  # undo the env init_parallel() set for a 1-process world
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ENV_SET.clear()


def free_port() -> int:
    """A TCP port free on localhost right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
