"""GQA self-attention without positional embedding, tensor-parallel over query groups.

Stage: the ``*`` layers of the hybrid stack. Input ``x: [s, b, h]`` (``[s/tp, b, h]`` under
sequence parallelism). Output ``[s(/tp), b, h]`` and this call's own keys/values
``(k, v): [b, ng_local, s, d]`` so that

* the context tower can expose its per-layer K/V to the denoiser,
* the denoiser can prepend the context's K/V (``kv_prefix``) to its own,
* decoding can keep a KV cache.

Weights use megatron's fused ``linear_qkv`` layout: rows grouped per query group as
``[q heads of the group ; k ; v]``, so a column split over TP ranks hands each rank whole
groups. Nemotron-H has no RoPE: order comes from the Mamba layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from twotower.model.core_attention import MaskSpec, build_core_attention


@dataclass
class SelfAttentionSubmodules:
    """The attention's linear layers (``specs.py``: megatron's tensor-parallel linears, or TE's with
    the layer's pre-norm fused into ``linear_qkv``)."""

    linear_qkv: type | ModuleSpec = ColumnParallelLinear
    linear_proj: type | ModuleSpec = RowParallelLinear


class SelfAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attention_backend: str = "auto",
                 submodules: SelfAttentionSubmodules | None = None):
        super().__init__(config)
        submodules = submodules or SelfAttentionSubmodules()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.groups_local = config.num_query_groups // tp
        self.heads_local = config.num_attention_heads // tp
        qkv_out = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, qkv_out, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv",
        )
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * self.head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
        )
        self.core_attention = build_core_attention(attention_backend)  # no parameters or buffers

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [s(/tp), b, h]`` -> ``q [b, nh_l, s, d]``, ``k, v [b, ng_l, s, d]``."""
        mixed, _ = self.linear_qkv(x)  # [s, b, ng_l * (hpg + 2) * d]; SP all-gathers the sequence
        s, b, _ = mixed.shape
        mixed = mixed.view(s, b, self.groups_local, self.heads_per_group + 2, self.head_dim)
        q = mixed[:, :, :, : self.heads_per_group].reshape(s, b, self.heads_local, self.head_dim)
        k = mixed[:, :, :, self.heads_per_group]
        v = mixed[:, :, :, self.heads_per_group + 1]
        # [s, b, heads, d] -> [b, heads, s, d]
        return q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    def forward(
        self,
        x: torch.Tensor,
        mask: MaskSpec | None = None,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        q_len: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend ``x``'s queries over ``kv_prefix`` (if any) followed by ``x``'s own keys.

        Args:
            x: ``[s(/tp), b, h]``.
            mask: which keys each query sees; default causal over the prefix + own keys.
            kv_prefix: ``(k, v)`` each ``[b, ng_l, p, d]``, prepended to this call's keys.
            q_len: unused placeholder for symmetry with other mixers.
        Returns:
            ``(out [s(/tp), b, h], (k, v))`` with this call's own ``k, v [b, ng_l, s, d]``.
        """
        q, k, v = self.qkv(x)
        own = (k, v)
        if kv_prefix is not None:
            k = torch.cat([kv_prefix[0].to(k.dtype), k], dim=2)
            v = torch.cat([kv_prefix[1].to(v.dtype), v], dim=2)
        if mask is None:
            mask = MaskSpec.causal(offset=k.shape[2] - q.shape[2])
        ctx = self.core_attention(q, k, v, mask)  # [b, nh_l, s, d]
        b, _, s, _ = ctx.shape
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.head_dim)
        out, _ = self.linear_proj(ctx)  # [s(/tp), b, h]; SP reduce-scatters
        return out, own
