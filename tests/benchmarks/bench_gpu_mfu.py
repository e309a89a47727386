"""bf16 tokens/s and MFU of ONE GPU on a slice of the 30B-A3B layer mix: AR step vs TwoTower step.

A few layers of each kind at full width (hidden 2688, Mamba 64x64 heads / 8 groups / state 128,
GQA 32/2 x 128, 128 experts top-6 + shared expert, vocab 131072), the real sequence length and
micro-batch of ``experiment=twotower_nano_2p1t`` (8192 tokens, micro-batch 1, recompute=mamba) and the
release's diffusion recipe (block 16), through the real Trainer: Float16Module, megatron DDP with
overlapped grad reduce / param gather, the distributed optimizer, the backends ``auto`` picks
(Transformer Engine, mamba-ssm / causal-conv1d kernels, compiled FlexAttention when installed).

MFU = model FLOPs of the step (``training/flops.py``: the TwoTower step counts the frozen context
forward, the denoiser forward + backward and the Mamba recompute) / step time / the GPU's bf16
datasheet peak. Prints a table and the TwoTower/AR ratios; ``--json FILE`` writes the numbers for
``twotower-plan --mfu-from FILE``. Without CUDA it says so and exits 0 (nothing to measure).

    python tests/benchmarks/bench_gpu_mfu.py --json mfu.json            # ~2-4 min on one H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))

#: Default slice: 2 Mamba, 2 MoE, 1 attention layer (the 30B mix is 23 M / 23 E / 6 *), in the
#: pattern's own order. All 128 experts of a MoE layer live on the one GPU (EP=1).
SLICE = "MEM*E"


def _run(objective: str, args, run_dir: Path) -> dict:
    import torch
    from train_helpers import compose

    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    steps = args.warmup + args.steps
    overrides = [
        "experiment=smoke_cpu", "model=nemotron3_nano_30b_a3b", f"model.pattern={args.pattern}", "diffusion=release",
        f"objective={objective}", "trainer.precision=bf16", f"trainer.seq_len={args.seq_len}",
        f"trainer.micro_batch_size={args.micro_batch}", f"trainer.global_batch_size={args.micro_batch}",
        f"trainer.max_steps={steps}", "trainer.log_interval=1", "trainer.eval_interval=0",
        f"trainer.run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", "checkpoint.interval=0",
        f"twotower.block_size={args.block_size}", f"twotower.recompute={args.recompute}",
        "optim.distributed_optimizer=true", "optim.warmup_steps=1",
    ]
    tr = None
    try:
        tr = Trainer(compose(*overrides))
        impl = tr.model.context_tower.layers[0] if hasattr(tr.model, "context_tower") else tr.model.layers[0]
        backend = type(impl.mixer.in_proj).__name__
        tr.train()
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    finally:
        if tr is not None:
            tr.close()
        destroy_parallel()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed),
            "tflops": statistics.median(r["tflops_per_device"] for r in timed),
            "loss": timed[-1]["loss"], "peak_mem_gib": peak_mem, "in_proj": backend}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default=SLICE, help="layer slice of the 30B mix (M, E, * symbols)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--recompute", default="mamba", choices=("none", "mamba", "full"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the numbers here (twotower-plan --mfu-from)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_mfu: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    from twotower.model import megatron_cpu

    megatron_cpu.apply()  # megatron bug fixes only (no CPU patches on a CUDA host)
    os.environ.setdefault("WORLD_SIZE", "1")
    gpu = torch.cuda.get_device_name()
    out = {"gpu": gpu, "pattern": args.pattern, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
    with tempfile.TemporaryDirectory() as tmp:
        for objective, key in (("ar", "ar"), ("diffusion", "twotower")):
            torch.cuda.reset_peak_memory_stats()
            out[key] = _run(objective, args, Path(tmp) / key)
    ar, tt = out["ar"], out["twotower"]
    print(f"one {gpu}, bf16, slice {args.pattern!r} of the 30B-A3B mix at full width, seq {args.seq_len}, "
          f"micro-batch {args.micro_batch}, in_proj {tt['in_proj']}")
    print("| step | tokens/s | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|")
    for name, r in (("AR", ar), ("TwoTower", tt)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_mem_gib']:.1f} |")
    print(f"TwoTower / AR: tokens/s {tt['tokens_per_s'] / ar['tokens_per_s']:.2f}x, MFU {tt['mfu'] / ar['mfu']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
