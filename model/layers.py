"""Hybrid layer (pre-norm + one mixer + residual) and the module specs that build them.

Stage: one entry of the Nemotron-H stack. A layer is ``x + mixer(rmsnorm(x))`` where the
mixer is chosen by the pattern symbol:

======  ==============================  ==============================================
symbol  mixer                           extra output (``aux``)
======  ==============================  ==============================================
``M``   ``MambaMixer`` (ours)           ``MambaStates`` when asked for states
``*``   ``SelfAttention`` (ours)        this call's ``(k, v)`` ``[b, ng_l, s, d]``
``E``   megatron-core ``MoELayer``      None
``-``   megatron-core ``MLP``           None
======  ==============================  ==============================================

Backends are chosen once, in ``get_hybrid_layer_specs``: a layer receives its mixer's
``ModuleSpec`` and never asks which implementation it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from twotower.model.adaln import Modulation
from twotower.model.attention import SelfAttention
from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.mamba import MambaMixer
from twotower.model.norm import RMSNorm


@dataclass
class HybridLayerSpecs:
    """One ``ModuleSpec`` per pattern symbol."""

    mamba: ModuleSpec
    attention: ModuleSpec
    moe: ModuleSpec
    mlp: ModuleSpec

    def for_symbol(self, symbol: str) -> ModuleSpec:
        return {"M": self.mamba, "*": self.attention, "E": self.moe, "-": self.mlp}[symbol]


def get_hybrid_layer_specs(backbone: BackboneConfig, parallel: ParallelConfig) -> HybridLayerSpecs:
    """Local (megatron tensor-parallel layers + torch/mamba-ssm kernels) specs.

    The linear layers are megatron's ``ColumnParallelLinear``/``RowParallelLinear``; the
    compute kernels inside (SDPA/FlexAttention, SSD scan, causal conv) pick CUDA kernels
    themselves through ``parallel.attention_backend`` / ``parallel.ssm_backend``.
    """
    dense = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return HybridLayerSpecs(
        mamba=ModuleSpec(module=MambaMixer, params={"backbone": backbone, "ssm_backend": parallel.ssm_backend}),
        attention=ModuleSpec(module=SelfAttention, params={"attention_backend": parallel.attention_backend}),
        moe=get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=backbone.num_experts,
                                            moe_grouped_gemm=False),
        mlp=ModuleSpec(module=MLP, submodules=dense, params={"ffn_hidden_size": backbone.ffn_hidden_size}),
    )


class HybridLayer(MegatronModule):
    """``x + mixer(norm(x))``; ``layer_number`` is 1-based and global (megatron convention)."""

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, symbol: str, layer_number: int):
        super().__init__(config)
        self.symbol = symbol
        self.layer_number = layer_number
        self.norm = RMSNorm(config.hidden_size, eps=config.layernorm_epsilon,
                            sequence_parallel=config.sequence_parallel)
        kwargs = {"config": config}
        if symbol in "M*E":
            kwargs["layer_number"] = layer_number
        self.mixer = build_module(spec, **kwargs)
        if symbol == "E":
            # megatron marks expert weights ``allreduce=False`` (reduced over the expert-data-
            # parallel group) only when EP > 1. With EP == 1 and TP > 1 (experts not TP-split)
            # every TP rank routes its own sequence shard through full expert copies, so their
            # gradients must still be summed over the expert-DP group, which contains the TP
            # ranks; treated as dense they would be reduced over DP only and silently stay
            # partial. DDP scales expert grads by 1/dp, so this is exact in every layout.
            for p in self.mixer.experts.parameters():
                p.allreduce = False

    def forward(self, x: torch.Tensor, modulation: Modulation | None = None,
                **mixer_kwargs) -> tuple[torch.Tensor, object]:
        """``x [s(/tp), b, h]`` -> ``(x + mixer(norm(x)), aux)``; see the module table for ``aux``.

        With ``modulation`` (the denoiser's adaLN-single) the release's per-type order applies:
        ``x + gate * mixer(norm(modulate(x)))`` for ``M``/``*`` (where megatron fuses the norm into
        ``in_proj``/``linear_qkv``) and ``x + gate * mixer(modulate(norm(x)))`` for ``E``/``-``.
        """
        if modulation is None:
            out, aux = self.mixer(self.norm(x), **mixer_kwargs)
        elif self.symbol in "M*":
            out, aux = self.mixer(self.norm(modulation.modulate(x)), **mixer_kwargs)
            out = modulation.gate * out
        else:
            out, aux = self.mixer(modulation.modulate(self.norm(x)), **mixer_kwargs)
            out = modulation.gate * out
        return x + out.to(x.dtype), (aux if self.symbol in "M*" else None)
