"""TP=2 and EP=2 backbones under torchrun (gloo) match the HF oracle like TP=1 does."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist" / "hf_parity.py"


@pytest.mark.distributed
@pytest.mark.parametrize("layout,config", [
    (["--tp", "2"], "all_types"),
    (["--ep", "2"], "mamba_moe"),
    (["--tp", "2"], "attn_mlp"),
])
def test_sharded_backbone_matches_hf(torchrun, tmp_path, layout, config):
    out = torchrun(SCRIPT, nproc=2, args=[*layout, "--config", config, "--ckpt", str(tmp_path / "hf")])
    assert out.stdout.count("logits max|diff|") == 2
