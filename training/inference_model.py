"""A trained TwoTower, whole and in eval mode, from a run directory, a checkpoint or an export.

Stage: decoding (``twotower-generate``) and export (``twotower-convert export-hf``). Sources:

* a ``twotower-train`` run directory (its ``config.yaml``; newest checkpoint or a given one);
* a checkpoint folder, or a folder of them (the model config recorded in its ``extra.json``
  by the trainer or by ``twotower-convert import-hf``; the context tower from the backbone
  recorded there, or ``backbone``);
* an exported / released-format Hugging Face folder (both towers and the time conditioning).

The tokenizer is found where the source records it: the training data's manifest, the
folder's own tokenizer files; ``None`` when there is none (use token ids).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from twotower.model.config import BackboneConfig
from twotower.model.two_tower import TwoTowerConfig
from twotower.training.checkpoint import CheckpointError


@dataclass
class LoadedModel:
    model: object
    """``TwoTowerModel`` (eval mode), built on a 1-process megatron world."""
    twotower: TwoTowerConfig
    tokenizer: str | None
    """A ``twotower.data.tokenizers.load_tokenizer`` spec, or None."""
    backbone: str | None
    """Where the context tower came from."""


def saved_model_config(ckpt: Path, backbone_override: str | None = None, allow_ar: bool = False) -> tuple:
    """``(BackboneConfig, TwoTowerConfig, backbone path, tokenizer spec)`` recorded in a checkpoint.

    ``allow_ar``: an ``objective=ar`` checkpoint (the backbone alone) is accepted too; its
    TwoTowerConfig is the default and its backbone path ``None`` (the checkpoint is the backbone;
    only then is it ``None``: a TwoTower checkpoint without one raises)."""
    cfg = json.loads((ckpt / "extra.json").read_text())["extra"].get("config") or {}
    objective = cfg.get("objective", "diffusion")
    if objective not in (("diffusion", "ar") if allow_ar else ("diffusion",)) or "model" not in cfg:
        raise CheckpointError(f"{ckpt}: not a TwoTower checkpoint (objective={cfg.get('objective')!r})")
    model_cfg = {k: (float(v) if k.startswith("mamba_dt_") else v) for k, v in cfg["model"].items()}
    if objective == "ar":
        return BackboneConfig(**model_cfg), TwoTowerConfig(), None, _tokenizer_of(cfg)
    names = {f.name for f in dataclasses.fields(TwoTowerConfig)}
    twotower = TwoTowerConfig(**{k: v for k, v in cfg["twotower"].items() if k in names})
    backbone = backbone_override or cfg.get("backbone")
    if not backbone:
        raise CheckpointError(f"{ckpt}: no backbone recorded; pass the context tower's HF folder (--backbone)")
    return BackboneConfig(**model_cfg), twotower, backbone, _tokenizer_of(cfg)


def _tokenizer_of(cfg: dict) -> str | None:
    if "trainer" not in cfg:  # an imported checkpoint: no training data
        return None
    data = cfg.get("data")
    if not data:
        return "byte"  # synthetic sequences (smoke runs) use the byte alphabet
    manifest = Path(data["train"][0]["path"]) / "manifest.json"
    return json.loads(manifest.read_text())["tokenizer"] if manifest.exists() else None


def load_for_inference(run: str | None = None, checkpoint: str | None = None, hf: str | None = None,
                       backbone: str | None = None) -> LoadedModel:
    """Exactly one of ``run`` / ``checkpoint`` / ``hf`` (``checkpoint`` may accompany ``run``)."""
    from megatron.core import parallel_state

    from twotower.model.parallel_init import init_parallel
    from twotower.model.released_format import load_context_tower, load_released_twotower
    from twotower.model.two_tower import build_two_tower
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer, find_checkpoint

    if not parallel_state.model_parallel_is_initialized():  # a second model in the same process
        init_parallel()
    if hf is not None:
        folder = Path(hf)
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
        twotower = TwoTowerConfig(block_size=cfg.get("twotower_block_size", 16),
                                  mask_token_id=cfg.get("mask_token_id", 3))
        model = build_two_tower(BackboneConfig.from_hf(folder), None, twotower)
        load_released_twotower(model, folder)
        has_tok = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        return LoadedModel(model.eval(), twotower, str(folder) if has_tok else None, str(folder))
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / "config.yaml").exists():
            raise CheckpointError(f"{run_dir}: no config.yaml (not a twotower-train run directory)")
        from omegaconf import OmegaConf

        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        checkpoint = checkpoint or saved["checkpoint"]["dir"]
    if checkpoint is None:
        raise ValueError("give a run directory, a checkpoint or an exported folder")
    ckpt = find_checkpoint(checkpoint)
    bb, twotower, backbone, tokenizer = saved_model_config(ckpt, backbone)
    model = build_two_tower(bb, None, twotower)
    load_context_tower(model.context_tower, backbone)
    Checkpointer(CheckpointConfig(dir=str(ckpt.parent))).load_weights(model, ckpt)
    return LoadedModel(model.eval(), twotower, tokenizer, backbone)
