"""Distributed, layout-independent training checkpoints (megatron ``dist_checkpointing``, torch_dist).

Stage: the training loop (save every ``interval`` steps, resume at start-up).

Layout on disk::

    {dir}/step_{N:08d}/            written as step_{N:08d}.tmp/, renamed when every rank is done
        .metadata, __*.distcp      torch_dist shards: model (+ optimizer) sharded state
        metadata.json              dist_checkpointing's own metadata (backend, version)
        common.pt                  dist_checkpointing's common (non-sharded) state
        scheduler.pt               scheduler.state_dict() (rank 0, torch.save)
        extra.json                 {"step": N, "extra": <caller's JSON-able dict>, "world_size": W}
        rng/rank_{r:05d}.pt        per-rank python / numpy / torch / megatron RNG tracker states
        COMPLETE                   written last (rank 0) before the rename

Model keys come from ``model/sharding.py``: TP/EP/PP-independent (global layer indices, Mamba fused
tensors split into components), so a checkpoint saved at one layout resumes at another (model
weights). The optimizer state is layout-independent as far as megatron's
``optimizer.sharded_state_dict`` is (its default formats reshard over DP/TP; see caveats in the
module's report). For a ``TwoTowerModel`` only the denoiser + adaLN are saved; the frozen context
tower must be loaded from the backbone BEFORE :meth:`Checkpointer.load`, which verifies its
fingerprint against the checkpoint's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Root folder of the run's checkpoints."""
    interval: int = 100
    """Save every this many optimizer steps (the trainer's business; 0 = never)."""
    resume: str = "auto"
    """``auto``: newest complete checkpoint under ``dir`` if any, else fresh; ``none``: always fresh;
    any other value: that checkpoint folder (error if missing or incomplete)."""
    init_from: str | None = None
    """Weights only (denoiser + time conditioning) from this complete checkpoint when the run
    starts fresh (nothing to resume): fresh optimizer and LR schedule, step 0. How a phase of a
    multi-phase recipe continues the previous phase (``conf/experiment/twotower_nano_phase*``)."""
    keep_last: int = 2
    """Keep this many newest complete checkpoints (0 = keep all); rank 0 prunes after a save."""
    optimizer_sharding: str = "fully_reshardable"
    """megatron ``distrib_optim_sharding_type`` of the distributed optimizer's state
    (``fully_reshardable``: any DP/TP layout; ``dp_reshardable``: same TP/PP only, faster)."""
    async_save: bool = False
    """Reserved: only synchronous saves are implemented (True raises)."""


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ helpers
def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _chunks(model) -> list:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for c in chunks:
        while hasattr(c, "module") and not hasattr(c, "denoiser_tower") and not hasattr(c, "layers"):
            c = c.module  # megatron DDP / Float16Module wrappers
        out.append(c)
    return out


def model_sharded_state_dict(model) -> dict:
    """The checkpointed sharded state of a TwoTowerModel / NemotronHModel (or a list of PP chunks)."""
    sd: dict = {}
    for c in _chunks(model):
        part = c.sharded_state_dict()
        dup = set(part) & set(sd)
        if dup:
            raise CheckpointError(f"model chunks share checkpoint keys {sorted(dup)[:5]}")
        sd.update(part)
    return sd


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized():
        state["tracker"] = tracker.get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def check_complete(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint, else a ``CheckpointError`` naming it and what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist (or is not a folder)")
    for name, what in ((COMPLETE, "the COMPLETE marker: a save was interrupted"),
                       ("metadata.json", "dist_checkpointing's metadata.json"),
                       (".metadata", "the torch_dist .metadata file"), ("extra.json", "extra.json")):
        if not (p / name).exists():
            raise CheckpointError(f"checkpoint {p} is incomplete: missing {what}")
    return p


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder: ``path`` itself, or the newest complete one under it."""
    p = Path(path)
    if p.is_dir() and not STEP_RE.match(p.name) and not (p / "extra.json").exists():
        latest = Checkpointer(CheckpointConfig(dir=str(p))).latest()
        if latest is None:
            raise CheckpointError(f"{p}: no complete checkpoint (a step_*/ folder with a {COMPLETE} marker) in it")
        p = latest
    return check_complete(p)


# ------------------------------------------------------------------------------------------------ API
class Checkpointer:
    def __init__(self, cfg: CheckpointConfig):
        if cfg.async_save:
            raise NotImplementedError("checkpoint.async_save: only synchronous saves are implemented")
        self.cfg = cfg
        self.root = Path(cfg.dir)

    def _meta(self) -> dict:
        return {"distrib_optim_sharding_type": self.cfg.optimizer_sharding}

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints under ``dir``, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).exists():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    # -------------------------------------------------------------------- save
    def save(self, step: int, model, optimizer, scheduler, extra: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint folder."""
        from megatron.core import dist_checkpointing

        final, tmp = self.path_for(step), self.root / f"step_{step:08d}.tmp"
        json.dumps(extra)  # fail early (before any I/O) on a non-JSON-able extra
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # a previous, interrupted save of the same step
            tmp.mkdir(parents=True)
        _barrier()
        model_sd = model_sharded_state_dict(model)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=self._meta())
        dist_checkpointing.save(state, str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "extra.json").write_text(json.dumps({"step": step, "world_size": _world(), "extra": extra},
                                                       indent=1))
        _barrier()  # every rank has written its shards and RNG file
        if _rank() == 0:
            (tmp / COMPLETE).write_text(f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.cfg.keep_last > 0:
            for p in self.complete()[: -self.cfg.keep_last]:
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------- load
    def resolve(self) -> Path | None:
        """The checkpoint :meth:`load` would read (``None``: start fresh), per ``cfg.resume``."""
        r = str(self.cfg.resume)
        if r == "none":
            return None
        if r == "auto":
            return self.latest()
        return check_complete(r)

    def saved_extra(self) -> dict | None:
        """The ``extra`` dict of the checkpoint :meth:`load` would read (no tensors), or None."""
        path = self.resolve()
        if path is None:
            return None
        check_complete(path)
        return json.loads((path / "extra.json").read_text())["extra"]

    def load(self, model, optimizer, scheduler, check=None) -> dict | None:
        """Collective. Loads model (+ optimizer, scheduler, this rank's RNG) from :meth:`resolve`;
        returns the saved ``extra`` dict, or ``None`` when starting fresh.

        ``check(path, extra)``, if given, runs before any tensor is read (e.g. to compare the
        saved config with this run's and raise a readable CheckpointError)."""
        path = self.resolve()
        if path is None:
            return None
        return self._load(path, model, optimizer, scheduler, check, restore_rng=True)

    def load_weights(self, model, path: str | Path) -> dict:
        """Collective. Only the model's weights from the checkpoint ``path`` (or the newest under
        it: ``init_from``); returns its saved ``extra`` dict."""
        return self._load(find_checkpoint(path), model, None, None, None, restore_rng=False)

    def _load(self, path: Path, model, optimizer, scheduler, check, restore_rng: bool) -> dict:
        from megatron.core import dist_checkpointing

        from twotower.model.sharding import context_fingerprint, copy_loaded, sharded_tensor_targets

        check_complete(path)
        if check is not None:
            check(path, json.loads((path / "extra.json").read_text())["extra"])
        model_sd = model_sharded_state_dict(model)
        targets = sharded_tensor_targets(model_sd)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=self._meta())
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except Exception as e:  # megatron's CheckpointingException, torch's CheckpointException
            if isinstance(e, CheckpointError):
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if "mismatch" in ln or "missing" in ln.lower()]
            raise CheckpointError(f"checkpoint {path} does not fit this model/layout: "
                                  f"{lines[0] if lines else str(e).splitlines()[-1]}") from e
        copy_loaded(targets, loaded["model"])
        for c in _chunks(model):
            if hasattr(c, "context_tower") and "context_fingerprint" in loaded["model"]:
                saved, now = loaded["model"]["context_fingerprint"], context_fingerprint(c.context_tower)
                if any(abs(saved[k] - now[k]) > 1e-9 * max(1.0, abs(now[k])) for k in saved):
                    raise CheckpointError(f"checkpoint {path}: the loaded context tower differs from the one "
                                          f"the checkpoint was trained with (fingerprint {now} != {saved}); "
                                          "load the same backbone before resuming")
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and (path / "scheduler.pt").exists():
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        meta = json.loads((path / "extra.json").read_text())
        rng = path / "rng" / f"rank_{_rank():05d}.pt"
        if restore_rng and meta.get("world_size") == _world() and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        _barrier()
        return meta["extra"]
