"""torchrun worker: our sharded backbone (TP/EP) vs the HF oracle, logits and gradients.

torchrun --nproc_per_node 2 tests/model/dist/hf_parity.py --tp 2 --ckpt DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--config", default="all_types")
    ap.add_argument("--ckpt", required=True)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from hf_tiny import hf_logits, tiny_hf_model

    from twotower.model.backbone import build_backbone
    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.parallel_init import init_parallel

    init_parallel(tp=args.tp, ep=args.ep)
    rank = torch.distributed.get_rank()
    hf = tiny_hf_model(args.config, seed=11)
    if rank == 0:
        hf.save_pretrained(args.ckpt)
    torch.distributed.barrier()

    cfg = BackboneConfig.from_hf(args.ckpt)
    par = ParallelConfig(
        tp=args.tp, ep=args.ep, sequence_parallel=args.tp > 1, attention_backend="sdpa", ssm_backend="torch"
    )
    ours = build_backbone(cfg, par)
    load_hf_backbone(ours, args.ckpt)

    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    want = hf_logits(hf, ids)
    got = ours(ids)
    diff = (got.detach() - want).abs().max().item()

    # Gradients: the loss of both models w.r.t. the final norm weight (replicated on every rank,
    # all-reduced under SP by megatron's finalize step; here we reduce by hand) must agree.
    labels = torch.roll(ids, -1, dims=1)
    loss = ours(ids, labels=labels).mean()
    loss.backward()
    g_ours = ours.final_norm.weight.grad.clone()
    if par.sequence_parallel:
        torch.distributed.all_reduce(
            g_ours,
            group=__import__(
                "megatron.core.parallel_state", fromlist=["x"]
            ).get_tensor_model_parallel_group(),
        )
    hf.zero_grad()
    ref = torch.nn.functional.cross_entropy(
        hf(input_ids=ids, use_cache=False).logits.reshape(-1, cfg.vocab_size), labels.reshape(-1)
    )
    ref.backward()
    gdiff = (g_ours - hf.model.norm_f.weight.grad).abs().max().item()
    print(
        f"rank {rank}: tp={args.tp} ep={args.ep} logits max|diff|={diff:.2e} final-norm grad max|diff|={gdiff:.2e}",
        flush=True,
    )
    if not (diff <= 1e-4 and gdiff <= 1e-4):
        sys.exit(1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
