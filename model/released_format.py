"""The released TwoTower checkpoint layout (``NemotronHTwoTowerForCausalLM``) -> our TwoTowerModel.

Stage: model initialisation (continue training NVIDIA's released denoiser; reference tests).
Input: a released-format folder (``config.json`` + safetensors, lazily sliced) or state dict;
output: this rank's shard of both towers and of the time conditioning, at any TP/EP/PP.

Key layout (spec release.md §3; ``{T}`` = ``context_tower`` or ``denoiser_tower``)::

    {T}.embeddings / {T}.layers.{i}.* / {T}.norm_f     a NemotronH tower (``hf_import.py``'s map)
    context_lm_head.weight, lm_head.weight             the context / denoiser heads
    t_embedder.mlp.{0,2}.*, t_block.1.*                the shared time network (replicated)
    scale_shift_tables.{i}                             per layer [3, h] (shift, scale, gate)

Our parameter names for the time conditioning ARE the release's, so that part is a copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from twotower.model.config import BackboneConfig
from twotower.model.hf_import import CheckpointKeyError, HFWeights, _check_same_shape, load_hf_backbone

#: tower attribute -> (key prefix in the released checkpoint, its head's key)
RELEASED_TOWERS = {"context_tower": ("context_tower.", "context_lm_head.weight"),
                   "denoiser_tower": ("denoiser_tower.", "lm_head.weight")}
TIME_PREFIXES = ("t_embedder.", "t_block.", "scale_shift_tables.")


def is_released_twotower(weights: HFWeights) -> bool:
    return any(n.startswith("denoiser_tower.") for n in weights.names())


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
            problems.append(f"shape mismatch: {key} is {tuple(shape)}, model expects {tuple(target.shape)}")
        else:
            target.copy_(weights.read(key).to(target.dtype))
    towers = tuple(p for p, _ in RELEASED_TOWERS.values()) + tuple(h for _, h in RELEASED_TOWERS.values())
    n_layers = model.backbone.num_layers
    other_stage = {f"scale_shift_tables.{i}" for i in range(n_layers)} - set(targets)  # other PP stages'
    unexpected = sorted(n for n in weights.names() if not n.startswith(towers) and n not in targets
                        and n not in other_stage)
    problems += [f"unexpected in checkpoint: {n}" for n in unexpected]
    if problems:
        raise CheckpointKeyError(f"{weights.where}: {len(problems)} problem(s) loading a released TwoTower "
                                 "checkpoint:\n  " + "\n  ".join(problems))
