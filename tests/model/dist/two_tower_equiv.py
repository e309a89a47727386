"""torchrun worker: TwoTower loss and denoiser gradients at TP=2 or EP=2; rank 0 saves them.

torchrun --nproc_per_node 2 tests/model/dist/two_tower_equiv.py --tp 2 --ctx A --den B --out F
"""

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--ctx", required=True)
    ap.add_argument("--den", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from two_tower_case import run_case

    from twotower.model.config import ParallelConfig
    from twotower.model.parallel_init import init_parallel

    init_parallel(tp=args.tp, ep=args.ep)
    par = ParallelConfig(
        tp=args.tp, ep=args.ep, sequence_parallel=args.tp > 1, attention_backend="sdpa", ssm_backend="torch"
    )
    loss, grads = run_case(args.ctx, args.den, par)
    if torch.distributed.get_rank() == 0:
        torch.save({"loss": loss, "grads": grads}, args.out)
    print(f"rank {torch.distributed.get_rank()}: loss {loss:.6f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
