"""torchrun worker: DistributedOptimizer (DP=2, torch Adam) save/load resume is exact.

Trains N steps uninterrupted; trains K steps, saves with dist_checkpointing, rebuilds a fresh model +
optimizer (different init), loads, trains N-K more. Losses and the per-param Adam ``step`` must match.
Done for both megatron sharding formats that work here (``dp_reshardable``, ``fully_reshardable``).
Also resumes once with megatron's unpatched ``DistributedOptimizer.load_state_dict`` and prints
``UNPATCHED ... exact=<bool>`` (the test checks the bug is still there, i.e. the fix is still needed).
argv: CKPT_ROOT  (--unpatched-load uses megatron's original load_state_dict).
"""

from __future__ import annotations

# the CPU runtime layer must be applied before megatron is imported: keep this import order
# isort: off
import os
import sys

from twotower.model import megatron_cpu, megatron_fixes, parallel_init

megatron_cpu.apply()  # explicit: importing twotower.model patches nothing

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import MegatronModule, TransformerConfig

# isort: on

N, K, H = 6, 3, 16
META = {"distrib_optim_sharding_type": "dp_reshardable"}
SHARDINGS = ("dp_reshardable", "fully_reshardable")


class Net(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        init = torch.nn.init.normal_
        self.fc1 = ColumnParallelLinear(
            H, 4 * H, config=config, init_method=init, bias=True, gather_output=False
        )
        self.fc2 = RowParallelLinear(
            4 * H, H, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
        )

    def forward(self, x):
        h, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(h))
        return y


def build(seed):
    torch.manual_seed(seed)
    parallel_init.init_parallel(
        tp=1, seed=seed
    ) if not parallel_state.model_parallel_is_initialized() else None
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, use_cpu_initialization=True)
    net = Net(cfg)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), net)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=3e-2, weight_decay=0.1, use_distributed_optimizer=True, clip_grad=1.0
        ),
        [ddp],
    )
    return ddp, opt


def batch(step):
    g = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    return torch.randn(8, H, generator=g), torch.randn(8, H, generator=g)


def train(ddp, opt, steps):
    losses = []
    for s in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        x, y = batch(s)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(t.item())
    return losses


def adam_steps(opt):
    opts = getattr(opt, "chained_optimizers", [opt])
    return sorted({float(s["step"]) for o in opts for s in o.optimizer.state.values()})


def resume(ckpt, first, unpatched):
    """Fresh model + optimizer (other init), load ``ckpt``, train steps K..N; returns (losses, steps)."""
    ddp, opt = build(99)  # a different init: everything must come from the checkpoint
    # no explicit megatron_fixes.init_optimizer_states(): the patched state_dict() initialises the
    # empty torch-Adam states that sharded_state_dict(is_loading=True) needs
    sd = {"model": ddp.module.sharded_state_dict()}
    sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True, metadata=META)
    loaded = dist_checkpointing.load(sd, ckpt)
    ddp.module.load_state_dict(loaded["model"])
    if unpatched:  # megatron's own DistributedOptimizer.load_state_dict
        orig = megatron_fixes._ORIG["mcore.DistributedOptimizer.load_state_dict"]
        for o in getattr(opt, "chained_optimizers", [opt]):
            orig(o, loaded["optimizer"])
    else:
        opt.load_state_dict(loaded["optimizer"])
    after_load = adam_steps(opt)
    losses = first + train(ddp, opt, range(K, N))
    return losses, after_load, adam_steps(opt)


def main():
    ckpt_root = sys.argv[1]
    parallel_init.init_parallel(tp=1, seed=7)
    rank = torch.distributed.get_rank()
    assert parallel_state.get_data_parallel_world_size() == 2

    ddp, opt = build(7)
    ref = train(ddp, opt, range(N))
    assert adam_steps(opt) == [float(N)], adam_steps(opt)

    for sharding in SHARDINGS:
        META["distrib_optim_sharding_type"] = sharding
        ckpt = os.path.join(ckpt_root, sharding)
        ddp, opt = build(7)
        first = train(ddp, opt, range(K))
        sd = {"model": ddp.module.sharded_state_dict()}
        sd["optimizer"] = opt.sharded_state_dict(sd["model"], metadata=META)
        if rank == 0:
            os.makedirs(ckpt, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(sd, ckpt)
        del ddp, opt

        losses, after_load, final = resume(ckpt, first, unpatched=True)
        print(
            f"rank{rank} {sharding} UNPATCHED step_after_load={after_load} exact={losses == ref}", flush=True
        )
        losses, after_load, final = resume(ckpt, first, unpatched=False)
        print(f"rank{rank} {sharding} ref={ref} resumed={losses} steps={after_load}->{final}", flush=True)
        assert after_load == [float(K)], f"{sharding}: Adam step after load {after_load} != {K}"
        assert final == [float(N)], f"{sharding}: Adam step after training {final} != {N}"
        assert losses == ref, f"{sharding}: resumed losses {losses} != uninterrupted {ref}"
        print(f"rank{rank} {sharding} RESUME_EXACT", flush=True)
    parallel_init.destroy_parallel()


if __name__ == "__main__":  # the torch_dist writer spawns a multiprocessing manager
    main()
