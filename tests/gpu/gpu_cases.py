"""Shared tiny-but-kernel-friendly configs of the GPU tests.

Widths are multiples of 8 (the causal-conv1d kernel's channel-last rule, TE's GEMM alignment) and
the Mamba head dim a power of two (mamba-ssm's Triton tiles); the block size is the release's 16.
"""

from __future__ import annotations

import pytest

from twotower.model.config import BackboneConfig, ParallelConfig

MODEL = dict(pattern="M*EM-E", vocab_size=256, hidden_size=128, num_attention_heads=4, num_query_groups=2,
             head_dim=32, mamba_num_heads=8, mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=16,
             mamba_chunk_size=64, ffn_hidden_size=256, num_experts=8, moe_topk=2, moe_ffn_hidden_size=64,
             moe_shared_expert_intermediate_size=128)
CFG = BackboneConfig(**MODEL)  # in_proj width 2*128 + 2*2*16 + 8 = 328, conv channels 192: both % 8 == 0
PAR = ParallelConfig(transformer_impl="auto", attention_backend="auto", ssm_backend="auto")


def train_overrides(run_dir, objective: str, impl: str, ssm: str, *extra: str) -> list[str]:
    """A two-step bf16 training run of ``CFG`` on synthetic data (Hydra overrides)."""
    model = [f"model.{k}={v!r}" if isinstance(v, str) else f"model.{k}={v}" for k, v in MODEL.items()]
    base = ["experiment=smoke_cpu", f"objective={objective}", *model, "trainer.precision=bf16",
            "trainer.max_steps=2", "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.seq_len=128",
            f"trainer.run_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", "checkpoint.interval=0",
            f"parallel.transformer_impl={impl}", f"parallel.ssm_backend={ssm}", "parallel.attention_backend=flex",
            *extra]
    return list({o.split("=", 1)[0]: o for o in base}.values())  # a later value of a key wins


def needs(module: str):
    """Skip unless ``module`` is installed (no import: TE without CUDA crashes on import)."""
    from twotower.model.backends import has_module

    return pytest.mark.skipif(not has_module(module), reason=f"needs {module} (not installed)")
