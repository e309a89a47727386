"""Tests for the CPU runtime layer ``twotower.model.megatron_cpu``: one test per patch, plus numerics of
patched megatron (TP=2 linears, DistributedOptimizer resume) under ``torchrun --nproc_per_node 2``."""

from __future__ import annotations

import re

import pytest
import torch

from twotower.model import megatron_cpu, megatron_fixes, parallel_init

pytestmark = pytest.mark.skipif(not megatron_cpu.CPU_ONLY, reason="CPU-only patches (CUDA available)")


def test_apply_is_idempotent_and_installs_every_patch():
    first = megatron_cpu.apply()
    assert megatron_cpu.apply() == first  # idempotent: nothing installed twice
    assert set(first) == {
        "current_device", "streams", "device_literals", "tensor_type", "torch_rng", "megatron_rng",
        "all_to_all_splits", "te_general_gemm", "distopt_step",
    }  # fmt: skip


def test_replace_fails_loudly_when_the_attribute_is_gone():
    class Owner:
        pass

    with pytest.raises(AssertionError, match="has no attribute 'missing'"):
        megatron_cpu._replace(Owner, "missing", None)


def test_megatron_version_is_one_the_bug_fixes_were_verified_for():
    assert megatron_fixes.mcore_version().startswith(megatron_fixes.VERIFIED_MCORE)


# -- 1. current_device --------------------------------------------------------------------------------
def test_current_device_is_cpu():
    dev = torch.cuda.current_device()
    assert dev == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    with torch.device("meta"):  # a model built on meta gets megatron's current_device() buffers there too
        assert torch.cuda.current_device() == torch.device("meta")
        assert torch.empty(2).device.type == "meta"  # the factory wrappers keep the device context
    assert torch.cuda.current_device() == torch.device("cpu")


# -- 2. streams / events ------------------------------------------------------------------------------
def test_streams_and_events_are_harmless_noops():
    s = torch.cuda.Stream(device="cuda")
    assert torch.cuda.current_stream() is torch.cuda.current_stream()
    assert torch.cuda.current_stream() != s  # megatron compares streams to decide on wait_stream
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.ones(3) * 2
    ev = s.record_event()
    assert isinstance(ev, megatron_cpu.CpuEvent) and ev.query()
    ev.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    torch.cuda.synchronize()
    assert x.tolist() == [2.0, 2.0, 2.0]


# -- 3. device='cuda' literals ------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda"), torch.device("cuda", 0), 0])
def test_cuda_device_literals_land_on_cpu(device):
    assert torch.zeros(3, device=device).device.type == "cpu"
    assert torch.tensor([1, 2], dtype=torch.int, device=device).tolist() == [1, 2]
    assert torch.ones(2, 2, device=device, pin_memory=True).sum().item() == 4.0  # pin_memory dropped
    assert torch.arange(4, device=device).tolist() == [0, 1, 2, 3]
    assert torch.empty(2, dtype=torch.int, device=device).device.type == "cpu"
    assert torch.zeros_like(torch.randn(2, 3), device=device).device.type == "cpu"
    x = torch.randn(2, 3)
    assert x.cuda().device.type == "cpu" and x.cuda(device).device.type == "cpu"


def test_tensor_cuda_is_a_noop_on_cpu():
    x = torch.randn(4, 3)
    assert x.cuda() is x  # like .cuda() on a CUDA tensor: no copy
    assert x.cuda(non_blocking=True) is x
    y = torch.randn(2, 3, 4, 5).cuda(memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)
    m = torch.nn.Linear(3, 2).cuda()
    assert m.weight.device.type == "cpu"


def test_patched_functions_trace_under_torch_compile():
    def f(x):
        y = x.type(torch.float64) + torch.zeros(3, device="cuda", dtype=torch.float64)
        return y.cuda() * torch.ones(3, device=torch.cuda.current_device(), dtype=torch.float64)

    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3))
    assert out.dtype == torch.float64 and out.tolist() == [1.0, 1.0, 1.0]


def test_factory_wrappers_still_compile_under_torchscript():
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(2) + torch.ones(2)

    scripted = torch.jit.script(f)
    assert scripted(torch.ones(2)).tolist() == [2.0, 2.0]


# -- 4. Tensor.type() strings -------------------------------------------------------------------------
def test_tensor_type_strings_are_cuda_style():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.half).type() == "torch.cuda.HalfTensor"
    y = torch.zeros(2).type(torch.float64)  # the conversion form is untouched
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert torch.zeros(2).type("torch.DoubleTensor").dtype == torch.float64


# -- 5. RNG ------------------------------------------------------------------------------------------
def test_cuda_rng_functions_act_on_the_cpu_generator():
    torch.cuda.manual_seed(5)
    a = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), a)
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), b)


def test_rng_tracker_fork_is_reproducible_and_isolated(megatron_world1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def run():
        model_parallel_cuda_manual_seed(123)
        before = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            m1 = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        after = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            m2 = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        return before, m1, after, m2

    r1, r2 = run(), run()
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)  # reseeding reproduces everything
    before, m1, after, m2 = r1
    assert not torch.equal(m1, m2)  # the forked stream advanced between forks
    model_parallel_cuda_manual_seed(123)
    plain = torch.rand(6)
    assert torch.equal(torch.cat([before, after]), plain)  # forks do not consume the default stream
    torch.manual_seed(123 + 2718)  # the tensor-model-parallel seed (tp_rank 0)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), p=0.5), m1)


# -- 6. all_to_all split sizes (+ TP=2 numerics): torchrun -------------------------------------------
@pytest.mark.distributed
def test_tp2_linears_match_torch_and_all_to_all_tensor_splits(torchrun):
    out = torchrun("tp2_checks.py", nproc=2, timeout=180).stdout
    assert out.count("TP2_OK") == 2, out[-5000:]
    # megatron's unpatched _AllToAll.forward really fails with tensor split sizes (patch still needed)
    assert out.count("unpatched_all_to_all_with_tensor_splits_works=False") == 2, out[-5000:]


def test_split_sizes_are_converted_to_int_lists():
    import numpy as np

    assert megatron_cpu._as_split_list(torch.tensor([3, 1])) == [3, 1]
    assert megatron_cpu._as_split_list(np.array([2, 0])) == [2, 0]
    assert megatron_cpu._as_split_list(None) is None


# -- 7. te_general_gemm --------------------------------------------------------------------------------
def test_topk_router_runs_without_transformer_engine(megatron_world1):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    assert not moe_utils.HAVE_TE and moe_utils.te_general_gemm is None
    cfg = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=4, moe_router_topk=2,
        moe_router_dtype="fp32", use_cpu_initialization=True, moe_aux_loss_coeff=0.0,
    )  # fmt: skip
    router = TopKRouter(cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    torch.nn.init.normal_(router.weight)
    bias = router.bias if router.bias is not None else torch.zeros(4)
    x = torch.randn(5, 2, 8, requires_grad=True)
    probs, routing_map = router(x)
    logits = x.reshape(-1, 8) @ router.weight.t() + bias
    top = logits.topk(2, dim=-1)
    want = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, -1))
    assert routing_map.shape == (10, 4) and routing_map.sum(-1).eq(2).all()
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-5)
    # (probs.sum() would be a constant: the top-k softmax of every token sums to 1)
    (probs * torch.randn(probs.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# -- 8. DistributedOptimizer resume --------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_optimizer_resume_is_exact(torchrun, tmp_path):
    out = torchrun("distopt_resume.py", nproc=2, args=[tmp_path / "ckpt"], timeout=240).stdout
    for sharding in ("dp_reshardable", "fully_reshardable"):
        assert out.count(f"{sharding} RESUME_EXACT") == 2, out[-5000:]
        # megatron's own load_state_dict is still wrong (else drop the fix): losses diverge after resume
        unpatched = re.findall(rf"{sharding} UNPATCHED step_after_load=\S+ exact=(True|False)", out)
        assert unpatched == ["False", "False"], out[-5000:]


def test_init_optimizer_states_keeps_weights_and_zeroes_state(megatron_world1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import MegatronModule, TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, use_cpu_initialization=True)

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.fc = ColumnParallelLinear(4, 4, config=cfg, init_method=torch.nn.init.normal_, bias=True)

    net = Net()
    before = {k: v.detach().clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), net)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.1, weight_decay=0.5, use_distributed_optimizer=True), [ddp]
    )
    for o in opt.chained_optimizers:
        megatron_fixes.init_optimizer_states(o)
        states = list(o.optimizer.state.values())
        assert states and all(float(s["step"]) == 0.0 and not s["exp_avg"].any() for s in states)
        assert len({id(s["step"]) for s in states}) == len(states)  # one step tensor per param
        assert o.state_dict()["optimizer"]["param_groups"][0]["step"] == 0  # no KeyError: 'step'
    for k, v in net.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_megatron_world1_fixture(megatron_world1):
    ps = megatron_world1
    assert torch.distributed.get_backend() == "gloo"
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_data_parallel_world_size() == 1
    assert ps.get_expert_model_parallel_world_size() == 1


def test_init_parallel_without_torchrun_env_is_one_process_and_cleans_up(monkeypatch):
    import os

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    parallel_init.init_parallel(tp=1, seed=3)
    try:
        from megatron.core import parallel_state

        assert torch.distributed.get_world_size() == 1 and parallel_state.model_parallel_is_initialized()
    finally:
        parallel_init.destroy_parallel()
    assert not torch.distributed.is_initialized()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
