"""torchrun worker: Checkpointer round trip of a tiny NemotronHModel + megatron Adam + scheduler.

--phase first:  train N steps uninterrupted (losses -> OUT/full.json); then, from a fresh model,
                train K steps, save (Checkpointer) with extra={"consumed": ...}.
--phase resume: a fresh model (other init, other RNG), load (resume=auto), train N-K steps
                (losses -> OUT/resumed.json). The test compares: losses bit-identical.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

N, K, B, L = 5, 2, 2, 8


def build(ctx: str, seed: int, distopt: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from twotower.model.backbone import build_backbone
    from twotower.model.config import BackboneConfig, ParallelConfig

    torch.manual_seed(seed)
    cfg = BackboneConfig.from_hf(ctx)
    model = build_backbone(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distopt),
                                  model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-4, weight_decay=0.1, clip_grad=1.0,
                                                 use_distributed_optimizer=distopt), [ddp])
    sched = OptimizerParamScheduler(opt, init_lr=1e-3, max_lr=1e-2, min_lr=1e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant")
    return cfg, model, ddp, opt, sched


def train(cfg, ddp, opt, sched, steps):
    losses = []
    for s in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        g = torch.Generator().manual_seed(1000 * s + torch.distributed.get_rank())
        ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
        # a little global-RNG use (dropout-like noise), so that the RNG restore matters
        noise = 1.0 + 0.01 * torch.rand(()) + 0.001 * random.random()
        loss = ddp(ids, labels=ids.roll(-1, 1)).mean() * noise
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        sched.step(1)
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(t.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", required=True)
    ap.add_argument("--ctx", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--distopt", type=int, default=0)
    args = ap.parse_args()
    from twotower.model.parallel_init import init_parallel
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer

    init_parallel(seed=5)
    out = Path(args.out)
    ck = Checkpointer(CheckpointConfig(dir=str(out / "ckpts"), resume="auto"))
    rank = torch.distributed.get_rank()
    if args.phase == "first":
        torch.manual_seed(3)
        random.seed(3)
        cfg, _, ddp, opt, sched = build(args.ctx, 0, bool(args.distopt))
        full = train(cfg, ddp, opt, sched, range(N))
        torch.manual_seed(3)
        random.seed(3)
        cfg, _, ddp, opt, sched = build(args.ctx, 0, bool(args.distopt))
        first = train(cfg, ddp, opt, sched, range(K))
        assert first == full[:K]
        ck.save(K, ddp, opt, sched, {"consumed": K * B * L, "first": first})
        if rank == 0:
            (out / "full.json").write_text(json.dumps(full))
    else:
        random.seed(77)
        cfg, _, ddp, opt, sched = build(args.ctx, 123, bool(args.distopt))  # other init: all from the ckpt
        extra = ck.load(ddp, opt, sched)
        assert extra is not None and extra["consumed"] == K * B * L, extra
        resumed = extra["first"] + train(cfg, ddp, opt, sched, range(K, N))
        if rank == 0:
            (out / "resumed.json").write_text(json.dumps(resumed))
    torch.distributed.barrier()
    print(f"rank {rank}: {args.phase} ok", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
