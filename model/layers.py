"""Hybrid layer: pre-norm + one mixer + residual, built from the specs of ``specs.py``.

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

Backends are chosen once, in ``specs.get_hybrid_layer_specs``: a layer receives its pre-norm and
mixer specs and never asks which implementation it runs. With Transformer Engine the ``M``/``*``
pre-norm is fused into the mixer's input linear (the layer's ``norm`` is an identity); the state
dict hooks below keep the checkpoint names backend-independent.
"""

from __future__ import annotations

import re

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from twotower.model.adaln import Modulation

#: TE names -> the local (canonical) names, relative to a layer. ``{e}``: expert index.
_FUSED_NORM = re.compile(r"^mixer\.(in_proj|linear_qkv)\.layer_norm_weight$")
_TE_EXPERT = re.compile(r"^mixer\.experts\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"^mixer\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


class HybridLayer(MegatronModule):
    """``x + mixer(norm(x))``; ``layer_number`` is 1-based and global (megatron convention)."""

    def __init__(self, config: TransformerConfig, specs, symbol: str, layer_number: int,
                 device: torch.device | str | None = None):
        super().__init__(config)
        self.symbol = symbol
        self.layer_number = layer_number
        self.fused_norm = symbol in specs.fused_norm_symbols
        self.transformer_impl = specs.transformer_impl
        self.norm = build_module(specs.norm_for_symbol(symbol), config.hidden_size, eps=config.layernorm_epsilon,
                                 sequence_parallel=config.sequence_parallel, device=device,
                                 dtype=config.params_dtype)
        kwargs = {"config": config}
        if symbol in "M*E":
            kwargs["layer_number"] = layer_number
        if symbol == "M":
            kwargs["device"] = device
        self.mixer = build_module(specs.for_symbol(symbol), **kwargs)
        if symbol == "E":
            # megatron marks expert weights ``allreduce=False`` (reduced over the expert-data-
            # parallel group) only when EP > 1. With EP == 1 and TP > 1 (experts not TP-split)
            # every TP rank routes its own sequence shard through full expert copies, so their
            # gradients must still be summed over the expert-DP group, which contains the TP
            # ranks; treated as dense they would be reduced over DP only and silently stay
            # partial. DDP scales expert grads by 1/dp, so this is exact in every layout.
            for p in self.mixer.experts.parameters():
                p.allreduce = False
        if specs.transformer_impl != "local":
            self._register_state_dict_hook(_to_canonical_names)
            self._register_load_state_dict_pre_hook(_from_canonical_names, with_module=True)
            self.register_load_state_dict_post_hook(_ignore_missing_extra_state)

    def forward(self, x: torch.Tensor, modulation: Modulation | None = None,
                **mixer_kwargs) -> tuple[torch.Tensor, object]:
        """``x [s(/tp), b, h]`` -> ``(x + mixer(norm(x)), aux)``; see the module table for ``aux``.

        With ``modulation`` (the denoiser's adaLN-single) the release's per-type order applies:
        ``x + gate * mixer(norm(modulate(x)))`` for ``M``/``*`` (where TE fuses the norm into
        ``in_proj``/``linear_qkv``) and ``x + gate * mixer(modulate(norm(x)))`` for ``E``/``-``.
        """
        if modulation is None:
            out, aux = self.mixer(self.norm(x), **mixer_kwargs)
        elif self.symbol in "M*":
            out, aux = self.mixer(self.norm(modulation.modulate(x)), **mixer_kwargs)
            out = modulation.apply_gate(out)
        else:
            out, aux = self.mixer(modulation.modulate(self.norm(x)), **mixer_kwargs)
            out = modulation.apply_gate(out)
        return x + out.to(x.dtype), (aux if self.symbol in "M*" else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron's recursion, with TE names mapped to the local ones (backend-independent keys)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.transformer_impl == "local":
            return sd
        out = {}
        for key, value in sd.items():
            local = key[len(prefix):]
            if local.endswith("_extra_state"):
                continue  # TE's FP8 metadata: not a weight, and absent from local-backend checkpoints
            if _FUSED_NORM.match(local):
                value.key = value.key.replace(local, "norm.weight")
                key = f"{prefix}norm.weight"
            out[key] = value
        return out


def _to_canonical_names(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if local.endswith("_extra_state"):
            del state_dict[key]
        elif _FUSED_NORM.match(local):
            state_dict[f"{prefix}norm.weight"] = state_dict.pop(key)
        elif m := _TE_EXPERT.match(local):
            state_dict[f"{prefix}mixer.experts.local_experts.{m.group(2)}.{m.group(1)}.weight"] = state_dict.pop(key)
    return state_dict


def _from_canonical_names(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    if module.fused_norm and f"{prefix}norm.weight" in state_dict:
        name = "in_proj" if module.symbol == "M" else "linear_qkv"
        state_dict[f"{prefix}mixer.{name}.layer_norm_weight"] = state_dict.pop(f"{prefix}norm.weight")
    if module.symbol == "E" and not hasattr(module.mixer.experts, "local_experts"):  # TE grouped experts
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if m := _LOCAL_EXPERT.match(key[len(prefix):]):
                state_dict[f"{prefix}mixer.experts.{m.group(2)}.weight{m.group(1)}"] = state_dict.pop(key)


def _ignore_missing_extra_state(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if not k.endswith("_extra_state")]
