"""Tiny random Hugging Face NemotronH models: the oracle for the backbone parity tests.

Imported by the tests in this folder and by the torchrun scripts in ``dist/``. Every config
exercises GQA and several experts; between them they cover all four layer types.
"""

from __future__ import annotations

import torch

#: name -> NemotronHConfig overrides. Sizes keep TP=2 / EP=2 legal (heads, groups, experts even).
TINY_CONFIGS = {
    "all_types": dict(layers_block_type=["linear_attention", "full_attention", "moe", "mlp",
                                         "linear_attention", "moe"]),
    "mamba_moe": dict(layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention", "moe"],
                      n_routed_experts=8, num_experts_per_tok=3, routed_scaling_factor=2.5),
    "attn_mlp": dict(layers_block_type=["full_attention", "mlp", "full_attention", "linear_attention"],
                     num_attention_heads=8, num_key_value_heads=2),
}


def tiny_hf_config(name: str = "all_types", **extra):
    from transformers import NemotronHConfig

    kw = dict(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
        conv_kernel=4, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, routed_scaling_factor=1.5, layer_norm_epsilon=1e-5,
        # A test setting: transformers' in-library NemotronH clamps dt at time_step_min whatever
        # time_step_limit says; the release (and we) follow time_step_limit. Make them agree.
        time_step_min=0.001, time_step_limit=(0.001, float("inf")),
    )
    kw.update(TINY_CONFIGS[name])
    kw.update(extra)
    return NemotronHConfig(**kw)


def tiny_hf_model(name: str = "all_types", seed: int = 0, **extra):
    """A randomly initialised fp32 ``NemotronHForCausalLM`` with non-trivial SSM/router params."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(tiny_hf_config(name, **extra)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("A_log", "dt_bias")):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif n.endswith(("D", "norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()
