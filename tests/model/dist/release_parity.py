"""torchrun worker: our TwoTower at TP=2 (+SP) or EP=2 on a released-format checkpoint; rank 0
saves the vectorised training logits and the per-block decode logits (compared with the
independent reference in tests/model/test_release_parity.py).

torchrun --nproc_per_node 2 tests/model/dist/release_parity.py --tp 2 --ckpt DIR --out FILE
"""

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_release_parity import MASK, TIMES, L, S, noisy_batch

    from twotower.model.cache import TowerCache
    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.parallel_init import init_parallel
    from twotower.model.released_format import load_released_twotower
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    init_parallel(tp=args.tp, ep=args.ep)
    par = ParallelConfig(tp=args.tp, ep=args.ep, sequence_parallel=args.tp > 1, attention_backend="sdpa",
                         ssm_backend="torch")
    model = build_two_tower(BackboneConfig.from_hf(args.ckpt), par, TwoTowerConfig(block_size=S, mask_token_id=MASK))
    load_released_twotower(model, args.ckpt)  # lazily sliced: each rank reads its own shards
    x0, xt, t, _ = noisy_batch(96, TIMES, seed=4)
    t = torch.tensor([[TIMES[(r + k) % 3] for k in range(L // S)] for r in range(len(TIMES))])
    with torch.no_grad():
        training = model(x0, xt, t, return_logits=True).logits
        blocks = []
        for blk in range(L // S):
            if blk:
                _, cache = model.context_forward(x0[:, : blk * S])
            else:
                cache = TowerCache.empty(len(model.context_tower.layers))
            blocks.append(model.denoise_block(xt[:, blk * S:(blk + 1) * S], t[:, blk], cache))
    if torch.distributed.get_rank() == 0:
        torch.save({"x0": x0, "xt": xt, "t": t, "training": training, "blocks": blocks}, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
