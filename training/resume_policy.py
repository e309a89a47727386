"""What a resume may change: the layout, batch, optimizer, LR schedule and noise settings (they apply
from the saved step on); not the model, the objective or the diffusion geometry (refused by name).

Stage: ``Checkpointer.load`` calls :func:`check_resumable` with the checkpoint's saved config (its
``extra.json``) before any tensor is read. The optimizer's saved per-group LR settings are replaced
by this run's in ``Checkpointer._load`` (``_GROUP_CONFIG_KEYS``), so an announced change really applies.
"""

from __future__ import annotations

from twotower.training.checkpoint import CheckpointError

#: Settings a resume must not change besides all of ``model.*`` and ``objective``: the diffusion geometry.
FIXED_ON_RESUME = {"twotower": ("block_size", "mask_token_id", "adaln_init")}
#: Settings that may change on resume (announced; this run's values apply from the saved step on).
APPLIED_ON_RESUME = {"trainer": ("max_steps", "global_batch_size", "seq_len"), "optim": None, "diffusion": None}


def _changed(saved: dict, now: dict, group: str, keys=None) -> list[tuple[str, object, object]]:
    s, n = saved.get(group) or {}, now.get(group) or {}
    return [(f"{group}.{k}", s[k], n.get(k)) for k in (keys or s) if k in s and s[k] != n.get(k)]


def check_resumable(path, extra: dict, now: dict, announce: bool = True) -> None:
    """``now``: this run's resolved config as a dict. Raises CheckpointError naming every field that
    may not change; prints (``announce``) the fields that changed and apply from the saved step on."""
    saved = extra.get("config") or {}
    fixed = _changed(saved, now, "model") + [d for g, keys in FIXED_ON_RESUME.items()
                                             for d in _changed(saved, now, g, keys)]
    if "objective" in saved and saved["objective"] != now["objective"]:
        fixed.append(("objective", saved["objective"], now["objective"]))
    if fixed:
        raise CheckpointError(f"checkpoint {path} was trained with another configuration; "
                              f"point checkpoint.dir elsewhere or checkpoint.resume=none: "
                              + "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in fixed))
    changed = [d for g, keys in APPLIED_ON_RESUME.items() for d in _changed(saved, now, g, keys)]
    if changed and announce:
        print(f"[twotower] resuming {path} with changed settings (this run's values apply from step "
              f"{extra.get('step')} on): " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed), flush=True)
