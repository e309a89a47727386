"""TP=2, EP=2, PP=2 and DP=2 reproduce the single-rank loss curve (same global batch, fp32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from hf_tiny import tiny_hf_model

SCRIPT = Path(__file__).parent / "dist" / "train_layout.py"
_REF: dict = {}
STEPS = 4


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """One HF checkpoint every layout starts from (random init would depend on the layout)."""
    path = tmp_path_factory.mktemp("layout_backbone") / "hf"
    tiny_hf_model("all_types", seed=5, vocab_size=96).save_pretrained(path)
    return path


def _overrides(backbone, run_dir, *extra):
    return ["experiment=smoke_cpu", f"backbone={backbone}", f"trainer.run_dir={run_dir}",
            f"trainer.max_steps={STEPS}", "trainer.seq_len=32", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=1", "twotower.block_size=8", "checkpoint.interval=0",
            "parallel.attention_backend=sdpa", "parallel.ssm_backend=torch", "optim.lr=3e-3",
            # the HF tiny model's shape (model.* must match the checkpoint)
            "model.pattern=M*E-ME", "model.vocab_size=96", "model.hidden_size=32", "model.head_dim=8",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.mamba_num_heads=4",
            "model.mamba_head_dim=8", "model.mamba_num_groups=2", "model.mamba_state_dim=8",
            "model.mamba_chunk_size=8", "model.ffn_hidden_size=48", "model.num_experts=4", "model.moe_topk=2",
            "model.moe_ffn_hidden_size=16", "model.moe_shared_expert_intermediate_size=24",
            "model.moe_routed_scaling_factor=1.5", *extra]


def _run(torchrun, nproc, out, overrides):
    torchrun(SCRIPT, nproc=nproc, args=[str(out), *overrides], timeout=600)
    return json.loads(Path(out).read_text())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel=tp2"],
    ["parallel=ep2"],
    ["parallel=pp2"],
    ["parallel=single"],  # 2 ranks -> DP=2
], ids=["tp2", "ep2", "pp2", "dp2"])
def test_layout_reproduces_single_rank_curve(torchrun, tmp_path, backbone, layout):
    if "ref" not in _REF:  # the single-rank oracle, computed once for all layouts
        _REF["ref"] = _run(torchrun, 1, tmp_path / "ref.json", _overrides(backbone, tmp_path / "ref"))
    ref = _REF["ref"]
    got = _run(torchrun, 2, tmp_path / "got.json", _overrides(backbone, tmp_path / "got", *layout))
    assert len(ref["losses"]) == len(got["losses"]) == STEPS
    for a, b in zip(ref["losses"], got["losses"]):
        assert b == pytest.approx(a, rel=1e-5), (ref["losses"], got["losses"], ref["grad_norms"], got["grad_norms"])
    for a, b in zip(ref["grad_norms"], got["grad_norms"]):
        assert b == pytest.approx(a, rel=1e-4), (ref["grad_norms"], got["grad_norms"])
    assert ref["losses"][-1] < ref["losses"][0]  # and it is training
