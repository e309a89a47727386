"""Planner: hand-computed memory for a tiny config, optimizer sharding, refusals, the 30B-A3B layouts, CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twotower.model.config import BackboneConfig, ParallelConfig, backbone_config_from_dict
from twotower.training.planner import GIB, PlanError, plan

TINY = {"pattern": "*-", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 1, "head_dim": 4,
            "ffn_hidden_size": 16, "num_experts": 4, "moe_topk": 2, "moe_ffn_hidden_size": 6,
            "moe_shared_expert_intermediate_size": 12}
KW = {"seq_len": 8, "micro_batch": 1, "block_size": 4, "token_budget": 1e6, "gpu_mem_gib": 80}


def _nano():
    p = Path(__file__).parents[2] / "conf/model/nemotron3_nano_30b_a3b.yaml"
    return backbone_config_from_dict(yaml.safe_load(p.read_text()))


def test_tiny_memory_by_hand():
    cfg = BackboneConfig(**TINY)
    p = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, distributed_optimizer=False, **KW)
    # params: attn 8*4*(2*2+2*1)=192 + norm 8; mlp 2*8*16=256 + norm 8; embedding + head 2*10*8=160 -> 624
    n = 624
    m = {k: v * GIB for k, v in p.memory_gib.items()}
    assert m["context tower (bf16)"] == 2 * n and m["denoiser params (bf16)"] == 2 * n
    assert m["denoiser main grads (fp32)"] == 4 * n and m["optimizer (fp32 master+Adam)"] == 12 * n
    # activations per token (bf16 values): attn 2h + (a+2k)e + 2ae = 16+16+16 = 48, mlp 2h + 2f = 48
    # -> 96 values * 2 bytes + context K/V 2*k*e*2 bytes = 16 -> 208 bytes * L=8
    assert m["activations"] == pytest.approx(208 * 8)
    assert m["logits (fp32+bf16)"] == 8 * 10 * 6 and m["mamba boundary states (1 layer)"] == 0
    # adaLN, 2 layers kept (recompute=mamba reruns M layers only): 2 h values * 2 bytes * L, plus the
    # per-sequence (shift, scale, gate) vectors 3 h * 2 bytes per layer (never per token)
    assert m["adaLN modulation (denoiser)"] == pytest.approx(2 * (2 * 8 * 2 * 8) + 2 * 3 * 8 * 2)
    assert p.memory_gib["fixed overhead"] == 4.0
    assert p.fits and p.tokens_per_step == 8


def test_distributed_optimizer_divides_by_dp():
    cfg = BackboneConfig(**TINY)
    on = plan(cfg, ParallelConfig(), num_gpus=4, global_batch=4, distributed_optimizer=True, **KW)
    off = plan(cfg, ParallelConfig(), num_gpus=4, global_batch=4, distributed_optimizer=False, **KW)
    key = "optimizer (fp32 master+Adam)"
    assert on.dp == 4 and on.memory_gib[key] == pytest.approx(off.memory_gib[key] / 4)
    assert on.memory_gib["denoiser main grads (fp32)"] == off.memory_gib["denoiser main grads (fp32)"]


@pytest.mark.parametrize("par, gpus, gb, field", [
    (ParallelConfig(tp=3), 3, 1, "tp"),          # 3 does not divide the heads
    (ParallelConfig(ep=3), 3, 3, "ep"),          # 3 does not divide the 4 experts (pattern with MoE below)
    (ParallelConfig(pp=5), 5, 1, "pp"),          # more stages than layers
    (ParallelConfig(pp=2), 3, 1, "world size"),
    (ParallelConfig(), 4, 6, "global_batch"),
])
def test_impossible_layouts_refused(par, gpus, gb, field):
    cfg = BackboneConfig(**dict(TINY, pattern="*-E"))
    with pytest.raises(PlanError, match=field):
        plan(cfg, par, num_gpus=gpus, global_batch=gb, **KW)


def test_nano_fits_at_good_layout_not_naive():
    cfg = _nano()
    kw = {"seq_len": 8192, "micro_batch": 1, "global_batch": 1024, "token_budget": 2.1e12}
    good = plan(cfg, ParallelConfig(ep=16), num_gpus=256, **kw)
    assert good.fits and good.total_gib < 80
    assert 1 < good.days < 60
    with pytest.raises(PlanError, match=r"exceeds gpu_mem_gib=80 by .*raise EP"):
        plan(cfg, ParallelConfig(), num_gpus=8, **kw)


def test_cli_prints_table():
    out = subprocess.run([sys.executable, "-m", "twotower.training.planner", "--gpus", "256", "--ep", "16",
                          "--tokens", "2.1e12"], capture_output=True, text=True, check=True).stdout
    assert "per-GPU memory" in out and "fits" in out and "days for the token budget" in out


def test_adaln_counts_per_token_extras_and_per_block_vectors_not_per_token():
    cfg = BackboneConfig(**dict(TINY, pattern="M*-"))
    seq = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, recompute="none", **KW)
    blk = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, recompute="none", time_per_block=True, **KW)
    mam = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, recompute="mamba", **KW)
    key, h, L = "adaLN modulation (denoiser)", 8, 8
    per_token = 3 * L * 2 * h * 2  # three layers kept, 2 h bf16 values per token each
    assert seq.memory_gib[key] * GIB == pytest.approx(per_token + 3 * 3 * h * 2)
    assert blk.memory_gib[key] * GIB == pytest.approx(per_token + 3 * (L // 4) * 3 * h * 2)  # 2 blocks
    assert mam.memory_gib[key] * GIB == pytest.approx(per_token * 2 / 3 + 3 * 3 * h * 2)  # M layer rerun


def test_mfu_is_an_input_with_its_source(tmp_path):
    import json

    from twotower.training.planner import ASSUMED_MFU, measured_mfu

    cfg = BackboneConfig(**TINY)
    assumed = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, **KW)
    assert f"mfu={ASSUMED_MFU:g}: assumed (no GPU measurement" in assumed.table()
    f = tmp_path / "mfu.json"
    f.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "ar": {"mfu": 0.5}, "twotower": {"mfu": 0.42}}))
    mfu, source = measured_mfu(str(f))
    measured = plan(cfg, ParallelConfig(), num_gpus=1, global_batch=1, mfu=mfu, mfu_source=source, **KW)
    assert "mfu=0.42: measured on NVIDIA H100 80GB HBM3" in measured.table()
    assert measured.step_time_s == pytest.approx(assumed.step_time_s * ASSUMED_MFU / 0.42)
    f.write_text("{}")
    with pytest.raises(PlanError, match="not a bench_gpu_mfu.py --json file"):
        measured_mfu(str(f))
