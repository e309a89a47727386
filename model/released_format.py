"""The released TwoTower checkpoint layout (``NemotronHTwoTowerForCausalLM``) <-> our TwoTowerModel.

Stage: model initialisation (continue training NVIDIA's released denoiser) and export.
Import: a released-format folder (``config.json`` + safetensors, lazily sliced) or state dict
-> this rank's shard of both towers and of the time conditioning, at any TP/EP/PP. Export:
full released-layout tensors, one layer at a time (gathered over TP/EP), for a streaming writer.

Key layout (spec release.md §3; ``{T}`` = ``context_tower`` or ``denoiser_tower``)::

    {T}.embeddings / {T}.layers.{i}.* / {T}.norm_f     a NemotronH tower (``hf_import.py``'s map)
    context_lm_head.weight, lm_head.weight             the context / denoiser heads
    t_embedder.mlp.{0,2}.*, t_block.1.*                the shared time network (replicated)
    scale_shift_tables.{i}                             per layer [3, h] (shift, scale, gate)

Our parameter names for the time conditioning ARE the release's, so that part is a copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from twotower.model.config import BackboneConfig
from twotower.model.hf_export import export_hf_tensors
from twotower.model.hf_import import CheckpointKeyError, HFWeights, _check_same_shape, load_hf_backbone

#: tower attribute -> (key prefix in the released checkpoint, its head's key)
RELEASED_TOWERS = {"context_tower": ("context_tower.", "context_lm_head.weight"),
                   "denoiser_tower": ("denoiser_tower.", "lm_head.weight")}
TIME_PREFIXES = ("t_embedder.", "t_block.", "scale_shift_tables.")


def is_released_twotower(weights: HFWeights) -> bool:
    return any(n.startswith("denoiser_tower.") for n in weights.names())


def checkpoint_kind(path: str | Path) -> str:
    """``"twotower"`` (released layout), ``"nemotron_h"`` (a backbone) for a HF folder; else a
    ``CheckpointKeyError`` naming what was found."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointKeyError(f"{path}: no config.json (expected a Hugging Face NemotronH or TwoTower folder)")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "nemotron_h":
        raise CheckpointKeyError(f"{path}: model_type={cfg.get('model_type')!r}, architectures={arch}; expected a "
                                 "NemotronHForCausalLM backbone or a NemotronHTwoTowerForCausalLM (released TwoTower)")
    if "NemotronHTwoTowerForCausalLM" in arch or is_released_twotower(HFWeights.from_dir(path)):
        return "twotower"
    return "nemotron_h"


def load_context_tower(tower, source: str | Path) -> None:
    """The frozen context tower from a backbone folder or from a released TwoTower's ``context_tower``."""
    if isinstance(source, (str, Path)) and checkpoint_kind(source) == "twotower":
        _check_same_shape(tower.backbone, BackboneConfig.from_hf(source), str(source))
        weights = HFWeights.from_dir(source).view("context_tower.", {"lm_head.weight": "context_lm_head.weight"})
        load_hf_backbone(tower, weights)
    else:
        load_hf_backbone(tower, source)


def iter_released_tensors(model, backbone_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(released name, full tensor)`` one embedding / layer / head at a time: collective over the
    TP and EP groups (every rank must iterate), so a writer holds at most one layer beyond its
    current shard. ``backbone_only``: the context tower as a stock ``NemotronHForCausalLM``
    (``backbone.*``, ``lm_head.weight``)."""
    towers = {"context_tower": ("backbone.", "lm_head.weight")} if backbone_only else RELEASED_TOWERS
    for attr, (prefix, head) in towers.items():
        tower = getattr(model, attr)
        sd = {k: v.detach() for k, v in tower.state_dict().items() if not k.endswith("_extra_state")}
        groups = [[k for k in sd if k.startswith("embedding.")]]
        groups += [[k for k in sd if k.startswith(f"layers.{j}.")] for j in range(len(tower.layers))]
        groups += [[k for k in sd if k.startswith(("final_norm.", "output_layer."))]]
        for keys in groups:
            for name, t in export_hf_tensors(tower, {k: sd[k] for k in keys}, prefix=prefix).items():
                yield (head if name == "lm_head.weight" else name), t
    if not backbone_only:
        for name, module in model.time_conditioning_modules().items():
            for k, p in module.named_parameters():
                yield f"{name}.{k}", p.detach()


@torch.no_grad()
def load_released_twotower(model, source: Any) -> None:
    """Copy a released-format TwoTower checkpoint into ``model`` (this rank's shards).

    Raises ``CheckpointKeyError`` listing every missing, unexpected and mis-shaped key."""
    if isinstance(source, (str, Path)):
        _check_same_shape(model.backbone, BackboneConfig.from_hf(source), str(source))
    weights = HFWeights.from_source(source)
    if not is_released_twotower(weights):
        raise CheckpointKeyError(f"{weights.where}: no denoiser_tower.* keys; not a released-format TwoTower "
                                 "checkpoint (a NemotronH backbone loads with load_hf_backbone)")
    problems = []
    for attr, (prefix, head) in RELEASED_TOWERS.items():
        try:
            load_hf_backbone(getattr(model, attr), weights.view(prefix, {"lm_head.weight": head}))
        except CheckpointKeyError as e:
            problems.append(f"[{attr}] {e}")
    targets = {f"{name}.{k}": p for name, module in model.time_conditioning_modules().items()
               for k, p in module.named_parameters()}
    for key, target in targets.items():
        shape = weights.shape(key)
        if shape is None:
            problems.append(f"missing in checkpoint: {key}")
        elif tuple(shape) != tuple(target.shape):
            problems.append(f"shape mismatch: {weights.located(key)} is {tuple(shape)}, model expects "
                            f"{tuple(target.shape)}")
        else:
            target.copy_(weights.read(key).to(target.dtype))
    towers = tuple(p for p, _ in RELEASED_TOWERS.values()) + tuple(h for _, h in RELEASED_TOWERS.values())
    n_layers = model.backbone.num_layers
    other_stage = {f"scale_shift_tables.{i}" for i in range(n_layers)} - set(targets)  # other PP stages'
    unexpected = sorted(n for n in weights.names() if not n.startswith(towers) and n not in targets
                        and n not in other_stage)
    problems += [f"unexpected in checkpoint: {weights.located(n)}" for n in unexpected]
    if problems:
        raise CheckpointKeyError(f"{weights.where}: {len(problems)} problem(s) loading a released TwoTower "
                                 "checkpoint:\n  " + "\n  ".join(problems))
