"""Benchmark the full training step (Trainer.train_step: micro-batches, noise, megatron
schedule, DDP, distributed optimizer) of TwoTower against AR on the same backbone and batch.

    .venv/bin/python tests/benchmarks/bench_train_step.py [--rounds 3] [--steps 4] [overrides ...]

Trainers cannot coexist in one process (one megatron parallel state), so the two objectives
alternate in rounds: each round builds an AR trainer, times ``--steps`` steps after one
warm-up step, tears it down, then the same for TwoTower. Reported: median step time over all
rounds, samples/s, model TFLOP/s (training/flops.py count) and the TwoTower/AR ratio, all
from this one run. No assertions (machine dependent); prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from train_helpers import compose

BASE = ["experiment=smoke_cpu", "logging=none", "checkpoint.interval=0", "trainer.seq_len=512",
        "twotower.block_size=16", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
        "parallel.attention_backend=sdpa", "parallel.ssm_backend=torch"]


def time_steps(objective: str, steps: int, overrides: list[str]) -> tuple[list[float], float, int]:
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    tr = Trainer(compose(*BASE, f"objective={objective}", f"trainer.max_steps={steps + 1}",
                         f"trainer.run_dir=/tmp/bench_train_step_{objective}", "checkpoint.resume=none",
                         *overrides))
    try:
        tr.train_step()  # warm-up (allocator, lazily built masks)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
        return times, tr.flops_per_step, tr.plan.global_batch_size
    finally:
        tr.close()
        destroy_parallel()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to both objectives")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from twotower.training.quiet import quiet_third_party

    quiet_third_party()
    times = {"ar": [], "diffusion": []}
    flops, batch = {}, 0
    for r in range(a.rounds):
        for obj in ("ar", "diffusion"):
            t, flops[obj], batch = time_steps(obj, a.steps, a.overrides)
            times[obj] += t
            print(f"round {r + 1}/{a.rounds} {obj}: median {statistics.median(t) * 1e3:.0f} ms/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nTrainer step benchmark: {' '.join(BASE + a.overrides)}; threads={a.threads}; "
          f"{a.rounds} rounds x {a.steps} steps per objective, medians\n")
    print("| objective | ms/step | samples/s | model GFLOP/s | ratio to AR |")
    print("|---|---|---|---|---|")
    for k, name in (("ar", "AR (one tower, next-token)"), ("diffusion", "TwoTower (ctx fwd + denoiser fwd/bwd)")):
        print(f"| {name} | {med[k] * 1e3:.0f} | {batch / med[k]:.2f} | {flops[k] / med[k] / 1e9:.2f} | "
              f"{med[k] / med['ar']:.2f}x time, {med['ar'] / med[k]:.2f}x samples/s |")
    print(f"\nFLOPs per step: AR {flops['ar'] / 1e9:.2f} G, TwoTower {flops['diffusion'] / 1e9:.2f} G "
          f"(ratio {flops['diffusion'] / flops['ar']:.2f}: the ideal time ratio at equal efficiency)")


if __name__ == "__main__":
    main()
