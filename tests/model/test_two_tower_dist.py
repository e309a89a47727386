"""TP=2 (+SP) and EP=2 (+DP=2) TwoTower: same loss and denoiser gradients as TP=1."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import tiny_hf_model
from two_tower_case import run_case

from twotower.model.config import ParallelConfig

SCRIPT = Path(__file__).parent / "dist" / "two_tower_equiv.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_tower_ckpts")
    tiny_hf_model("all_types", seed=21).save_pretrained(root / "ctx")
    tiny_hf_model("all_types", seed=22).save_pretrained(root / "den")
    return root / "ctx", root / "den"


@pytest.fixture(scope="module")
def reference(checkpoints):
    """TP=1 oracle, in a fresh process-group (module-scoped fixture cannot use megatron_world1)."""
    from twotower.model.parallel_init import destroy_parallel, init_parallel

    init_parallel()
    try:
        return run_case(str(checkpoints[0]), str(checkpoints[1]), ParallelConfig(attention_backend="sdpa",
                                                                                  ssm_backend="torch"))
    finally:
        destroy_parallel()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]], ids=["tp2", "ep2"])
def test_two_tower_layout_matches_tp1(torchrun, tmp_path, checkpoints, reference, layout):
    out = tmp_path / "result.pt"
    torchrun(SCRIPT, nproc=2, args=[*layout, "--ctx", str(checkpoints[0]), "--den", str(checkpoints[1]),
                                    "--out", str(out)])
    got = torch.load(out)
    ref_loss, ref_grads = reference
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert got["grads"].keys() == ref_grads.keys()
    bad = {k: (got["grads"][k] - v).abs().max().item() for k, v in ref_grads.items()
           if not torch.allclose(got["grads"][k], v, atol=1e-6, rtol=1e-4)}
    assert not bad, bad
