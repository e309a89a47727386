"""Distributed checkpointing of the TwoTower's trained parts is layout-independent.

A TwoTower saved at TP=2 (+SP) loads exactly at TP=2, EP=2, PP=2 and TP=1; one saved at PP=2
loads exactly at TP=1 (global layer keys). Exactness is checked on the gathered HF tensors.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "dist"))
from hf_tiny import tiny_hf_model

SCRIPT = Path(__file__).parent / "dist" / "sharding_reshard.py"


@pytest.fixture(scope="module")
def ctx_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding_ctx")
    tiny_hf_model("all_types", seed=21).save_pretrained(root / "ctx")
    return root / "ctx"


def test_sharded_keys_are_layout_independent(megatron_world1, ctx_ckpt):
    """Fused Mamba tensors are split into components; layers carry global indices; context not saved."""
    import sharding_reshard as sr
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.sharding import backbone_sharded_state_dict
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    model = sr.build(str(ctx_ckpt), "tp1")
    sd = sr.sharded_sd(model)
    assert not any(k.startswith("context_tower") for k in sd)
    assert isinstance(sd["context_fingerprint"], ShardedObject)
    m = "denoiser_tower.layers.0.mixer."
    f = sd[m + "in_proj.weight"]
    assert isinstance(f, ShardedTensorFactory)
    keys = [t.key for t in f.build_fn(f.key, f.data, f.replica_id, None)]
    assert keys == [m + f"in_proj.weight.{c}" for c in ["z", "x", "B", "C", "dt"]]
    assert isinstance(sd[m + "conv1d_weight"], ShardedTensorFactory)
    assert sd["denoiser_tower.layers.0.mixer.out_proj.weight"].global_shape[1] == model.backbone.mamba_d_inner

    cfg = BackboneConfig.from_hf(str(ctx_ckpt))
    late = build_two_tower(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"),
                           TwoTowerConfig(block_size=4, mask_token_id=3), pre_process=False, layer_range=(3, 6))
    layer_keys = {k.split(".")[1] for k in backbone_sharded_state_dict(late.denoiser_tower) if k.startswith("layers.")}
    assert layer_keys == {"3", "4", "5"}


@pytest.mark.distributed
@pytest.mark.slow
def test_reshard_tp2_ep2_pp2_tp1(torchrun, tmp_path, ctx_ckpt):
    import sharding_reshard as sr

    from twotower.model.parallel_init import destroy_parallel, init_parallel

    # save at TP=2+SP, reload at TP=2, EP=2 and PP=2; save at PP=2 (each stage writes its layers)
    proc = torchrun(SCRIPT, nproc=2, args=["--ctx", ctx_ckpt, "--work", tmp_path, "--steps",
                                           "save:tp2:ckA,load:tp2:ckA,load:ep2:ckA,load:pp2:ckA,save:pp2:ckB"])
    assert proc.stdout.count(" ok") == 10, proc.stdout[-5000:]
    # ... and reload both at TP=1 in this process
    init_parallel()
    try:
        for name in ("ckA", "ckB"):
            ref = torch.load(tmp_path / f"{name}.ref.pt")
            model = sr.build(str(ctx_ckpt), "tp1")
            assert sr.compare(sr.snapshot(model), ref), "fresh model already equals the checkpoint"
            fp = sr.load(model, str(tmp_path / name))
            got = sr.snapshot(model)
            assert not sr.compare(got, ref), f"{name}: mismatching tensors {sr.compare(got, ref)}"
            assert fp == pytest.approx(got["fingerprint"], rel=1e-9)
            assert fp == pytest.approx(ref["fingerprint"], rel=1e-9)
    finally:
        destroy_parallel()
