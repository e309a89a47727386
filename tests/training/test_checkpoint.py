"""Checkpointer: exact resume (model + megatron Adam + scheduler + RNG + extra), layout on disk,
auto / none / explicit-path resume, half-written checkpoints, pruning, context fingerprint."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from hf_tiny import tiny_hf_model

SCRIPT = Path(__file__).parent / "dist" / "ckpt_roundtrip.py"


@pytest.fixture(scope="module")
def ctx_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_ctx")
    tiny_hf_model("all_types", seed=21).save_pretrained(root / "ctx")
    tiny_hf_model("all_types", seed=22).save_pretrained(root / "other")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,distopt", [(1, 0), (2, 1)], ids=["dp1-adam", "dp2-distopt"])
def test_resume_is_bit_identical(torchrun, tmp_path, ctx_ckpt, nproc, distopt):
    """Train K, save, continue in a fresh process == train straight through (losses bit-identical)."""
    common = ["--ctx", ctx_ckpt / "ctx", "--out", tmp_path, "--distopt", distopt]
    torchrun(SCRIPT, nproc=nproc, args=["--phase", "first", *common])
    torchrun(SCRIPT, nproc=nproc, args=["--phase", "resume", *common])
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed == full
    ck = tmp_path / "ckpts" / "step_00000002"
    assert {"COMPLETE", "extra.json", "metadata.json", ".metadata", "scheduler.pt"} <= {p.name for p in ck.iterdir()}
    assert sorted(p.name for p in (ck / "rng").iterdir()) == [f"rank_{r:05d}.pt" for r in range(nproc)]


def _backbone(ctx):
    from twotower.model.backbone import build_backbone
    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.hf_import import load_hf_backbone

    cfg = BackboneConfig.from_hf(str(ctx))
    model = build_backbone(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"))
    load_hf_backbone(model, str(ctx))
    return model


def test_auto_none_path_incomplete_and_pruning(megatron_world1, tmp_path, ctx_ckpt):
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer, CheckpointError

    model = _backbone(ctx_ckpt / "ctx")
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), keep_last=2))
    assert ck.latest() is None and ck.load(model, None, None) is None  # auto, nothing there: fresh
    saved = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.layers[0].mixer.in_proj.weight.add_(0.5)
        saved[step] = model.layers[0].mixer.in_proj.weight.detach().clone()
        ck.save(step, model, None, None, {"step": step})
    assert [p.name for p in ck.complete()] == ["step_00000002", "step_00000003"]  # keep_last pruned step 1

    # half-written: a newer step without the COMPLETE marker, and a leftover .tmp folder
    half = tmp_path / "step_00000004"
    shutil.copytree(tmp_path / "step_00000003", half)
    (half / "COMPLETE").unlink()
    shutil.copytree(tmp_path / "step_00000003", tmp_path / "step_00000005.tmp")
    assert ck.latest() == tmp_path / "step_00000003"
    with torch.no_grad():
        model.layers[0].mixer.in_proj.weight.zero_()
    assert ck.load(model, None, None) == {"step": 3}
    assert torch.equal(model.layers[0].mixer.in_proj.weight, saved[3])

    with pytest.raises(CheckpointError, match=f"{half}.*COMPLETE"):
        Checkpointer(CheckpointConfig(dir=str(tmp_path), resume=str(half))).load(model, None, None)
    missing = tmp_path / "step_00000009"
    with pytest.raises(CheckpointError, match=str(missing)):
        Checkpointer(CheckpointConfig(dir=str(tmp_path), resume=str(missing))).load(model, None, None)
    no_meta = tmp_path / "step_00000002"
    (no_meta / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=f"{no_meta}.*metadata"):
        Checkpointer(CheckpointConfig(dir=str(tmp_path), resume=str(no_meta))).load(model, None, None)

    explicit = Checkpointer(CheckpointConfig(dir=str(tmp_path), resume=str(tmp_path / "step_00000003")))
    assert explicit.load(model, None, None) == {"step": 3}
    with torch.no_grad():
        model.layers[0].mixer.in_proj.weight.zero_()
    assert Checkpointer(CheckpointConfig(dir=str(tmp_path), resume="none")).load(model, None, None) is None
    assert not model.layers[0].mixer.in_proj.weight.any()  # none: nothing loaded


def test_two_tower_saves_denoiser_only_and_checks_context(megatron_world1, tmp_path, ctx_ckpt):
    from twotower.model.config import BackboneConfig, ParallelConfig
    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer, CheckpointError

    def build(ctx):
        cfg = BackboneConfig.from_hf(str(ctx))
        m = build_two_tower(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"),
                            TwoTowerConfig(block_size=4, mask_token_id=3))
        load_hf_backbone(m.context_tower, str(ctx))
        m.init_denoiser_from_context()
        return m

    model = build(ctx_ckpt / "ctx")
    with torch.no_grad():
        model.denoiser_tower.layers[1].mixer.linear_qkv.weight.mul_(1.5)
        model.scale_shift_tables['2'].add_(0.25)
        model.t_block[1].weight.add_(0.01)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    path = ck.save(7, model, None, None, {})
    assert json.loads((path / "extra.json").read_text())["step"] == 7
    fresh = build(ctx_ckpt / "ctx")
    assert ck.load(fresh, None, None) == {}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    other = build(ctx_ckpt / "other")  # a different backbone under the context tower: refused
    with pytest.raises(CheckpointError, match="context tower differs"):
        ck.load(other, None, None)
