"""The non-tensor files of an exported folder: ``config.json``, ``generation_config.json``, the
tokenizer and our remote code (``hf_remote/``), so that plain ``transformers`` loads it.

Stage: export, after ``safetensors_writer`` wrote the weights. Released TwoTower layout (spec
release.md §2): the backbone's NemotronH config with ``architectures:
["NemotronHTwoTowerForCausalLM"]``, ``auto_map`` pointing at the copied remote code and the
layer pattern as ``hybrid_override_pattern`` (no ``layers_block_type`` list: the remote config
derives it). ``--backbone-only``: a stock ``NemotronHForCausalLM`` config (transformers' own class).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from twotower.model.config import BackboneConfig

#: Our remote code, shipped as package data and copied next to an export's config.json.
REMOTE_CODE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_nemotron_twotower.py", "modeling_nemotron_twotower.py")
AUTO_MAP = {"AutoConfig": "configuration_nemotron_twotower.NemotronHTwoTowerConfig",
            "AutoModelForCausalLM": "modeling_nemotron_twotower.NemotronHTwoTowerForCausalLM"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_TINY = 1e-30  # a clamp at 1e-30 only touches dt + dt_bias < -69


def export_config(backbone: BackboneConfig, dtype: str, backbone_only: bool, source_config: dict | None = None,
                  mask_token_id: int = 3, block_size: int = 16) -> dict:
    """The ``config.json`` of an export (``source_config``: the backbone's own, for special ids)."""
    cfg = backbone.to_hf_dict()
    # The release's remote code and ours clamp dt by time_step_limit (written by to_hf_dict when
    # set) and use time_step_min only to initialise dt. transformers' own NemotronH (the
    # --backbone-only export) clamps at time_step_min at run time: make that the clamp we trained
    # with, with a tiny positive floor instead of 0 (its init divides by time_step_min).
    cfg["time_step_min"] = max(backbone.mamba_dt_min, _TINY) if backbone_only else (
        (source_config or {}).get("time_step_min", 0.001))
    cfg["num_hidden_layers"] = backbone.num_layers
    cfg |= {k: (source_config or {}).get(k, v) for k, v in _SPECIAL_IDS.items()}
    cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    if backbone_only:
        return cfg
    cfg.pop("layers_block_type")
    cfg["hybrid_override_pattern"] = backbone.pattern
    cfg["architectures"] = ["NemotronHTwoTowerForCausalLM"]
    cfg["auto_map"] = dict(AUTO_MAP)
    # not read by the released class (it takes mask_token_id per call); recorded for drivers
    cfg["mask_token_id"] = mask_token_id
    cfg["twotower_block_size"] = block_size
    return cfg


def write_export_metadata(folder: Path, backbone: BackboneConfig, backbone_src: str | Path | None, dtype: str,
                          backbone_only: bool, twotower, tokenizer_files: list[Path]) -> None:
    """Write everything but the weights into ``folder`` (``backbone_src`` ``None``: an AR run's
    checkpoint, whose special ids are ours: bos 1, eos 2, pad 0)."""
    src_cfg_file = Path(backbone_src) / "config.json" if backbone_src is not None else None
    source = json.loads(src_cfg_file.read_text()) if src_cfg_file is not None and src_cfg_file.exists() else None
    cfg = export_config(backbone, dtype, backbone_only, source, twotower.mask_token_id, twotower.block_size)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"_from_model_config": True, **{k: cfg[k] for k in _SPECIAL_IDS}}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if not backbone_only:
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    for f in tokenizer_files:
        shutil.copyfile(f, folder / f.name)
