"""On a CUDA host: no CPU patch is applied, backends resolve to the GPU ones that are installed, and
the builders put every parameter and buffer on the GPU with every spec provider available."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from twotower.model import backends, megatron_cpu

pytestmark = pytest.mark.gpu
CPU_ONLY_PATCHES = {"current_device", "streams", "device_literals", "tensor_type", "torch_rng", "megatron_rng",
                    "all_to_all_splits"}


def test_cpu_patches_are_not_applied(gpu_world1):
    assert not CPU_ONLY_PATCHES & set(megatron_cpu.applied_patches())
    assert isinstance(torch.cuda.current_device(), int)
    assert torch.zeros(1, device="cuda").is_cuda  # device literals untouched
    assert torch.zeros(1).cuda().is_cuda and torch.zeros(1).type() == "torch.FloatTensor"


def test_auto_backends_are_the_installed_gpu_ones():
    te = backends.has_module("transformer_engine")
    kernels = backends.has_module("mamba_ssm") and backends.has_module("causal_conv1d")
    assert backends.resolve("transformer_impl", "auto") == ("transformer_engine" if te else "local")
    assert backends.resolve("ssm_backend", "auto") == ("mamba_ssm" if kernels else "torch")
    assert backends.resolve("attention_backend", "auto") == "flex"


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_every_tensor_is_built_on_the_gpu(gpu_world1, impl):
    if backends.unavailable(impl):
        pytest.skip(f"{impl}: {backends.unavailable(impl)}")
    from gpu_cases import CFG, PAR

    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    par = dataclasses.replace(PAR, transformer_impl=impl)
    model = build_two_tower(CFG, par, TwoTowerConfig(block_size=16), params_dtype=torch.bfloat16)
    off = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != gpu_world1]
    assert off == []
