"""torchrun worker (and importable helpers): save a TwoTower's sharded state at one layout, load at others.

torchrun --nproc_per_node 2 tests/model/dist/sharding_reshard.py --ctx A --den B --work DIR \
    --steps save:tp2:ckA,load:tp2:ckA,load:ep2:ckA,save:pp2:ckB

``save:LAYOUT:NAME`` builds the model at LAYOUT, perturbs the denoiser + adaLN deterministically,
saves ``DIR/NAME`` and (rank 0) ``DIR/NAME.ref.pt`` (its gathered HF tensors + adaLN + fingerprint);
``load:LAYOUT:NAME`` builds a fresh model (denoiser = context copy), loads ``DIR/NAME`` and checks
the gathered tensors equal the reference exactly. Layouts: tp1, tp2, ep2, pp2.
"""

import argparse
import sys
from pathlib import Path

import torch

S, MASK = 4, 3
LAYOUTS = {"tp1": {"tp": 1, "ep": 1, "pp": 1}, "tp2": {"tp": 2, "ep": 1, "pp": 1},
           "ep2": {"tp": 1, "ep": 2, "pp": 1}, "pp2": {"tp": 1, "ep": 1, "pp": 2}}


def build(ctx: str, layout: str):
    from megatron.core import parallel_state as ps
    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    lay = LAYOUTS[layout]
    cfg = BackboneConfig.from_hf(ctx)
    par = ParallelConfig(tp=lay["tp"], ep=lay["ep"], pp=lay["pp"], sequence_parallel=lay["tp"] > 1,
                         attention_backend="sdpa", ssm_backend="torch")
    kw = {}
    if lay["pp"] > 1:
        r, n, L = ps.get_pipeline_model_parallel_rank(), lay["pp"], cfg.num_layers
        kw = {"pre_process": r == 0, "post_process": r == n - 1, "layer_range": (r * L // n, (r + 1) * L // n)}
    model = build_two_tower(cfg, par, TwoTowerConfig(block_size=S, mask_token_id=MASK), **kw)
    load_hf_backbone(model.context_tower, ctx)
    model.init_denoiser_from_context()
    return model


def time_params(model) -> dict:
    """The time conditioning under its release names (tables: this pipeline stage's layers)."""
    return {f"{m}.{k}": p for m, mod in model.time_conditioning_modules().items() for k, p in mod.named_parameters()}


@torch.no_grad()
def perturb(model) -> None:
    """Layout-agnostic enough: every local tensor gets a deterministic, name-dependent offset."""
    import zlib

    # seeded by name: the time network every pipeline stage holds gets the same offset everywhere
    for name, p in sorted(model.denoiser_tower.named_parameters()) + sorted(time_params(model).items()):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        p.add_(0.01 * torch.randn(p.shape, generator=g))


def snapshot(model) -> dict:
    """Full HF tensors of the denoiser (gathered over TP/EP, merged over PP) + adaLN, on every rank."""
    from twotower.model.hf_export import export_hf_tensors
    from twotower.model.sharding import context_fingerprint

    full = export_hf_tensors(model.denoiser_tower, prefix="denoiser.")
    full = {k: v.clone() for k, v in full.items()} | {k: v.detach().clone() for k, v in time_params(model).items()}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, full)
        for p in parts:
            full.update(p)
    return {"tensors": full, "fingerprint": context_fingerprint(model.context_tower)}


def sharded_sd(model):
    from twotower.model.sharding import twotower_sharded_state_dict

    return twotower_sharded_state_dict(model)


def save(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_sd(model), path)


def load(model, path: str) -> dict:
    """Load ``path`` into ``model``; returns the saved context fingerprint."""
    from megatron.core import dist_checkpointing
    from twotower.model.sharding import copy_loaded, sharded_tensor_targets

    sd = sharded_sd(model)
    targets = sharded_tensor_targets(sd)
    loaded = dist_checkpointing.load(sd, path)
    n = copy_loaded(targets, loaded)
    assert n == len(targets), (n, len(targets))
    return loaded["context_fingerprint"]


def compare(got: dict, ref: dict) -> list[str]:
    bad = [k for k in ref["tensors"] if k not in got["tensors"] or not torch.equal(got["tensors"][k], ref["tensors"][k])]
    bad += [f"extra {k}" for k in got["tensors"] if k not in ref["tensors"]]
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from megatron.core import parallel_state as ps
    from twotower.model.parallel_init import init_parallel

    rank = None
    for step in args.steps.split(","):
        op, layout, name = step.split(":")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_parallel(**LAYOUTS[layout])
        rank = torch.distributed.get_rank()
        model = build(args.ctx, layout)
        ck, ref_path = f"{args.work}/{name}", f"{args.work}/{name}.ref.pt"
        if op == "save":
            perturb(model)
            save(model, ck)
            snap = snapshot(model)
            if rank == 0:
                torch.save(snap, ref_path)
        else:
            before = snapshot(model)
            fp = load(model, ck)
            got = snapshot(model)
            ref = torch.load(ref_path)
            bad = compare(got, ref)
            assert not bad, f"{step}: mismatching tensors {bad}"
            assert compare(before, ref), f"{step}: the fresh model already equals the checkpoint (test is vacuous)"
            assert all(
                abs(fp[k] - got["fingerprint"][k]) <= 1e-9 * abs(got["fingerprint"][k]) for k in fp), (fp, got)
        torch.distributed.barrier()
        print(f"rank {rank}: {step} ok", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
