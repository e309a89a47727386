"""The megatron-core ``TransformerConfig`` for a backbone, a layout and a device.

Stage: model construction (``build_backbone``, ``build_two_tower``). Megatron sees a plain
GPT-like config; the Nemotron-H specifics (Mamba, pattern) live in our modules.

megatron's fast path for this architecture, on when the model is built on CUDA with
``parallel.fusions`` (always off on CPU and ``meta``):

* Transformer Engine (``parallel.transformer_impl``, ``specs.py``): fused RMSNorm + GEMM for the
  Mamba ``in_proj`` / attention ``linear_qkv``; ``gradient_accumulation_fusion`` (TE accumulates
  weight gradients straight into megatron's fp32 ``main_grad`` buffers);
* MoE: grouped GEMM over the local experts (``moe_grouped_gemm``, TE) and the fused token
  permute / unpermute (``moe_permute_fusion``);
* bf16 parameters with fp32 main gradients (``DistributedDataParallelConfig`` in the trainer).

The other megatron fusions do not apply here: ``bias_activation_fusion`` / ``bias_dropout_fusion``
(Nemotron-H has no biases and no dropout; squared-ReLU has no fused bias kernel),
``masked_softmax_fusion`` (our core attention is SDPA / FlexAttention), ``apply_rope_fusion`` (no
RoPE), ``persist_layer_norm`` (apex's LayerNorm; our norms are RMSNorm or TE's).
"""

from __future__ import annotations

from typing import Any

import torch

from twotower.model import backends
from twotower.model.config import BackboneConfig, ParallelConfig


def to_transformer_config(model: BackboneConfig, parallel: ParallelConfig, *,
                          params_dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                          **overrides: Any):
    """The ``TransformerConfig`` for this backbone, layout and device (see the module docstring).

    ``overrides`` go straight into TransformerConfig (e.g. ``recompute_granularity``)."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    model.validate_parallel(parallel)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    te = cuda and backends.resolve("transformer_impl", parallel.transformer_impl) == "transformer_engine"
    fuse = cuda and parallel.fusions
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=False,  # Nemotron-H has none; megatron's expert MLPs with bias also hit a view bug
        gated_linear_unit=False,
        activation_func=squared_relu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,  # dtype of the tensors pipeline stages exchange
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        # Without this megatron silently treats expert params as DP-replicated.
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        # CPU / meta: allocate with torch's default device (device.building_on) and initialise the
        # full matrix before splitting it (the same init for every TP size). CUDA: megatron's
        # per-rank init on the current device.
        use_cpu_initialization=not cuda,
        # TE fuses the weight-gradient GEMM with the accumulation into main_grad; megatron's local
        # linears would need apex's fused_weight_gradient_mlp_cuda for the same.
        gradient_accumulation_fusion=fuse and te,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
    )
    if "E" in model.pattern:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=model.moe_router_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=model.moe_routed_scaling_factor,
            moe_router_dtype=model.moe_router_dtype,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type=parallel.moe_token_dispatcher,
            moe_grouped_gemm=te,  # TEGroupedMLP (specs.py); SequentialMLP otherwise
            moe_permute_fusion=fuse and te,
            # The fp64 sigmoid router with score-correction bias stays megatron's reference path.
            moe_router_fusion=False,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
