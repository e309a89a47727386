"""Backend spec providers: the one place that decides which modules build a hybrid layer.

Stage: model construction. Input: the backbone and parallel configs. Output: a
``HybridLayerSpecs`` (one pre-norm spec and one mixer ``ModuleSpec`` per pattern symbol). Layers
and mixers receive their submodules from here and never ask which backend they run on.

* ``local`` (CPU, or CUDA without Transformer Engine): megatron's ``ColumnParallelLinear`` /
  ``RowParallelLinear``, our ``RMSNorm`` pre-norms, megatron's ``SequentialMLP`` experts.
* ``transformer_engine`` (CUDA with TE; megatron's TE modules, as its own
  ``get_gpt_layer_with_transformer_engine_spec`` / Mamba stack spec): Mamba ``in_proj`` and attention
  ``linear_qkv`` are ``TELayerNormColumnParallelLinear`` with the pre-norm fused in. That is exactly
  the release's order for ``M``/``*`` layers (adaLN modulates the residual stream *before* the norm:
  ``mixer(norm(modulate(x)))``, ``layers.py``), so the layer's own norm is an identity there. ``E``
  / ``-`` layers modulate *after* the norm and keep a separate RMSNorm. Experts are TE grouped GEMMs
  (``TEGroupedMLP``) with megatron's fused permute (``moe_permute_fusion``, ``transformer_config.py``);
  other linears are ``TEColumnParallelLinear`` / ``TERowParallelLinear``.

Checkpoints and HF exports do not depend on the backend: ``layers.py`` maps the fused norm weight
(``mixer.in_proj.layer_norm_weight`` / ``mixer.linear_qkv.layer_norm_weight``) to ``norm.weight`` and
TE grouped-expert weights (``experts.linear_fc1.weight{e}``) to the ``SequentialMLP`` names
(``experts.local_experts.{e}.linear_fc1.weight``), and drops TE's FP8 ``_extra_state``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from twotower.model import backends
from twotower.model.attention import SelfAttention, SelfAttentionSubmodules
from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.mamba import MambaMixer, MambaMixerSubmodules
from twotower.model.norm import RMSNorm


@dataclass
class HybridLayerSpecs:
    """One ``(pre-norm, mixer)`` spec pair per pattern symbol, and the backend that made them."""

    mamba: ModuleSpec
    attention: ModuleSpec
    moe: ModuleSpec
    mlp: ModuleSpec
    norm: ModuleSpec
    """The separate pre-norm (``E``, ``-`` layers; ``M``/``*`` too when not fused)."""
    fused_norm_symbols: str = ""
    """Symbols whose pre-norm lives inside the mixer's input linear (TE)."""
    transformer_impl: str = "local"

    def for_symbol(self, symbol: str) -> ModuleSpec:
        return {"M": self.mamba, "*": self.attention, "E": self.moe, "-": self.mlp}[symbol]

    def norm_for_symbol(self, symbol: str) -> ModuleSpec:
        return ModuleSpec(module=IdentityOp) if symbol in self.fused_norm_symbols else self.norm


def get_hybrid_layer_specs(backbone: BackboneConfig, parallel: ParallelConfig) -> HybridLayerSpecs:
    """The specs of ``parallel.transformer_impl`` (``auto``: TE when it imports and CUDA is present)."""
    impl = backends.resolve("transformer_impl", parallel.transformer_impl)
    if impl == "transformer_engine":
        return _te_specs(backbone, parallel)
    return _local_specs(backbone, parallel)


def _mixers(backbone: BackboneConfig, parallel: ParallelConfig, fused_in, column, row) -> dict:
    mamba = ModuleSpec(module=MambaMixer, params={"backbone": backbone, "ssm_backend": parallel.ssm_backend},
                       submodules=MambaMixerSubmodules(in_proj=fused_in, out_proj=row))
    attention = ModuleSpec(module=SelfAttention, params={"attention_backend": parallel.attention_backend},
                           submodules=SelfAttentionSubmodules(linear_qkv=fused_in, linear_proj=row))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
                     params={"ffn_hidden_size": backbone.ffn_hidden_size})
    return {"mamba": mamba, "attention": attention, "mlp": mlp, "norm": ModuleSpec(module=RMSNorm)}


def _local_specs(backbone: BackboneConfig, parallel: ParallelConfig) -> HybridLayerSpecs:
    moe = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=backbone.num_experts,
                                          moe_grouped_gemm=False)
    return HybridLayerSpecs(moe=moe, transformer_impl="local",
                            **_mixers(backbone, parallel, ColumnParallelLinear, ColumnParallelLinear,
                                      RowParallelLinear))


def _te_specs(backbone: BackboneConfig, parallel: ParallelConfig) -> HybridLayerSpecs:
    # Imported here only: TE's import needs CUDA (backends.unavailable checked it).
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    moe = get_moe_module_spec_for_backend(TESpecProvider(), num_experts=backbone.num_experts,
                                          moe_grouped_gemm=True)
    return HybridLayerSpecs(moe=moe, fused_norm_symbols="M*", transformer_impl="transformer_engine",
                            **_mixers(backbone, parallel, TELayerNormColumnParallelLinear,
                                      TEColumnParallelLinear, TERowParallelLinear))
