"""Gather a sharded backbone (weights, or anything shaped like them: gradients) into full
Hugging Face ``NemotronHForCausalLM`` tensors; write a HF checkpoint folder.

Stage: export (and the TP/EP == TP=1 tests, which compare gathered gradients). Inputs: a
``NemotronHModel`` on the current megatron parallel state and, optionally, a mapping of
its local state-dict keys to tensors (default: its weights). Output: ``{hf_name: full
tensor}`` with the on-disk names (``backbone.`` prefix, one tensor per expert), identical
on every rank of the TP and EP groups. The exact inverse of ``hf_import.py``.

Pipeline parallelism: each stage exports its own layer range under global layer indices;
callers merge the stages' dicts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from megatron.core import parallel_state

from twotower.model.config import BackboneConfig


def _gather(t: torch.Tensor, dim: int, group) -> list[torch.Tensor]:
    """All shards of ``t`` over ``group`` in rank order (``dim`` only documents the split)."""
    world = torch.distributed.get_world_size(group) if group is not None else 1
    if world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def _components(parts: list[torch.Tensor], local_sizes: list[int]) -> torch.Tensor:
    """Shards laid out ``[c1_r ; c2_r ; ...]`` -> full ``[c1 ; c2 ; ...]`` along dim 0."""
    split = [p.split(local_sizes, dim=0) for p in parts]
    return torch.cat([torch.cat([s[c] for s in split], 0) for c in range(len(local_sizes))], 0)


def export_hf_tensors(model, tensors: Mapping[str, torch.Tensor] | None = None,
                      prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Full HF tensors from ``model``'s local shards (or from ``tensors`` keyed like its state dict)."""
    bb: BackboneConfig = model.backbone
    src = dict(tensors) if tensors is not None else {k: v.detach() for k, v in model.state_dict().items()
                                                     if not k.endswith("_extra_state")}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        out[name if name.startswith("lm_head") else prefix + name] = value

    def rows(key):
        return torch.cat(_gather(src[key], 0, tp_group), 0)

    def cols(key):
        return torch.cat(_gather(src[key], 1, tp_group), 1)

    for key in list(src):
        if key == "embedding.word_embeddings.weight":
            put("embeddings.weight", rows(key))
        elif key == "output_layer.weight":
            put("lm_head.weight", rows(key))
        elif key == "final_norm.weight":
            put("norm_f.weight", src[key])
    gn_l = bb.mamba_num_groups * bb.mamba_state_dim // tp
    di_l, nh_l = bb.mamba_d_inner // tp, bb.mamba_num_heads // tp
    for j, layer in enumerate(model.layers):
        i = model.layer_offset + j
        d, hf = f"layers.{j}.", f"layers.{i}."
        if d + "norm.weight" in src:
            put(hf + "norm.weight", src[d + "norm.weight"])
        m, h = d + "mixer.", hf + "mixer."
        have = (lambda k, m=m: m + k in src)
        if layer.symbol == "M":
            if have("in_proj.weight"):
                put(h + "in_proj.weight", _components(_gather(src[m + "in_proj.weight"], 0, tp_group),
                                                      [di_l, di_l, gn_l, gn_l, nh_l]))
            if have("conv1d_weight"):
                full = _components(_gather(src[m + "conv1d_weight"], 0, tp_group), [di_l, gn_l, gn_l])
                put(h + "conv1d.weight", full[:, None, :])
            if have("conv1d_bias"):
                put(h + "conv1d.bias", _components(_gather(src[m + "conv1d_bias"], 0, tp_group), [di_l, gn_l, gn_l]))
            for p in ("A_log", "D", "dt_bias", "norm.weight"):
                if have(p):
                    put(h + p, rows(m + p))
            if have("out_proj.weight"):
                put(h + "out_proj.weight", cols(m + "out_proj.weight"))
        elif layer.symbol == "*":
            if have("linear_qkv.weight"):
                dh, ng = bb.head_dim, bb.num_query_groups
                hpg = bb.num_attention_heads // ng
                full = rows(m + "linear_qkv.weight").view(ng, (hpg + 2) * dh, -1)
                put(h + "q_proj.weight", full[:, : hpg * dh].reshape(ng * hpg * dh, -1))
                put(h + "k_proj.weight", full[:, hpg * dh:(hpg + 1) * dh].reshape(ng * dh, -1))
                put(h + "v_proj.weight", full[:, (hpg + 1) * dh:].reshape(ng * dh, -1))
            if have("linear_proj.weight"):
                put(h + "o_proj.weight", cols(m + "linear_proj.weight"))
        elif layer.symbol == "-":
            if have("linear_fc1.weight"):
                put(h + "up_proj.weight", rows(m + "linear_fc1.weight"))
            if have("linear_fc2.weight"):
                put(h + "down_proj.weight", cols(m + "linear_fc2.weight"))
        else:
            if have("router.weight"):
                put(h + "gate.weight", src[m + "router.weight"])
            if have("router.expert_bias"):
                put(h + "gate.e_score_correction_bias", src[m + "router.expert_bias"])
            local = bb.num_experts // ep
            for le in range(local):
                for ours, theirs in (("linear_fc1", "up_proj"), ("linear_fc2", "down_proj")):
                    k = f"{m}experts.local_experts.{le}.{ours}.weight"
                    if k in src:
                        for er, t in enumerate(_gather(src[k], 0, ep_group)):
                            put(f"{h}experts.{er * local + le}.{theirs}.weight", t)
            if have("shared_experts.linear_fc1.weight"):
                put(h + "shared_experts.up_proj.weight", rows(m + "shared_experts.linear_fc1.weight"))
                put(h + "shared_experts.down_proj.weight", cols(m + "shared_experts.linear_fc2.weight"))
    return out


def save_hf_checkpoint(model, path: str | Path, dtype: torch.dtype | None = None,
                       extra_config: Mapping | None = None) -> Path | None:
    """Write ``config.json`` + ``model.safetensors`` for the (single-stage) ``model``; rank 0 writes."""
    from safetensors.torch import save_file

    tensors = export_hf_tensors(model)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
               for k, v in tensors.items()}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")  # never leave a half-written file under the real name
    cfg = model.backbone.to_hf_dict() | dict(extra_config or {})
    if dtype is not None:
        cfg["torch_dtype"] = re.sub(r"^torch\.", "", str(dtype))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
