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
        manifest.json              size + CRC-32 of every file above, from every rank (checkpoint_integrity.py)
        COMPLETE                   written last (rank 0) before the rename
    {dir}/step_{N:08d}.broken/     a damaged checkpoint that ``resume=auto`` moved aside (never deleted)
    {dir}/superseded-{time}/       the checkpoints a ``resume=none`` run found here (kept, never resumed)

Recovery (:meth:`Checkpointer.load`, :meth:`Checkpointer.save`): files are checked against the
manifest before any tensor is read; a failed save removes its ``.tmp`` folder and names the cause.

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

from twotower.training import checkpoint_integrity as integrity
from twotower.training.checkpoint_integrity import (  # also the errors' public home
    COMPLETE,
    CheckpointError,
    CorruptCheckpointError,
    check_complete,
)

STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Root folder of the run's checkpoints."""
    interval: int = 100
    """Save every this many optimizer steps (the trainer's business; 0 = never)."""
    resume: str = "auto"
    """``auto``: newest intact checkpoint under ``dir`` if any (a damaged newer one is moved aside),
    else fresh; ``none``: fresh, the checkpoints already in ``dir`` are moved to ``dir/superseded-*``;
    any other value: that checkpoint folder (error if missing, incomplete or damaged)."""
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


#: Optimizer param-group settings that come from this run's config, not from the checkpoint.
_GROUP_CONFIG_KEYS = ("max_lr", "min_lr", "betas", "eps", "wd_mult", "lr_mult")


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


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder: ``path`` itself, or the newest complete one under it."""
    p = Path(path)
    if p.is_dir() and not STEP_RE.match(p.name) and not (p / "extra.json").exists():
        latest = Checkpointer(CheckpointConfig(dir=str(p))).latest()
        if latest is None:
            raise CheckpointError(f"{p}: no complete checkpoint (a step_*/ folder with a {COMPLETE} marker) in it")
        p = latest
    return check_complete(p)


def _on_rank0(what: str, fn):
    """Collective: ``fn()`` on global rank 0 only; every rank returns its result, or raises the same
    CheckpointError when it failed (so that no rank is left waiting in a collective)."""
    out = err = None
    if _rank() == 0:
        try:
            out = fn()
        except OSError as e:
            err = f"{what}: {integrity.describe(e)[0]}"
    out, err = integrity.all_gather((out, err))[0]
    if err:
        raise CheckpointError(err)
    return out


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
        """Collective: every rank calls it. Returns the final checkpoint folder. When writing fails on
        any rank (disk full, read-only directory) every rank raises the same CheckpointError naming
        the directory and the cause, the ``.tmp`` folder is removed and the older checkpoints stay."""
        from megatron.core import dist_checkpointing

        final, tmp = self.path_for(step), self.root / f"step_{step:08d}.tmp"
        json.dumps(extra)  # fail early (before any I/O) on a non-JSON-able extra
        rank, failure = _rank(), None
        if rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # a previous, interrupted save of the same step
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = integrity.describe(e)
        self._raise_if_failed(step, tmp, integrity.all_gather(failure))
        model_sd = model_sharded_state_dict(model)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=self._meta())
        entries: dict = {}
        try:
            dist_checkpointing.save(state, str(tmp))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
            if rank == 0:
                if scheduler is not None:
                    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "extra.json").write_text(json.dumps({"step": step, "world_size": _world(), "extra": extra},
                                                           indent=1))
            entries = integrity.own_entries(tmp, rank)
        except integrity.IO_ERRORS as e:
            failure = integrity.describe(e)
        gathered = integrity.all_gather((failure, entries))  # every rank has written (or failed) its files
        self._raise_if_failed(step, tmp, [f for f, _ in gathered])
        if rank == 0:
            try:  # the manifest before the COMPLETE marker: a complete checkpoint always has one
                integrity.write(tmp, integrity.complete_manifest(tmp, [e for _, e in gathered]))
                (tmp / COMPLETE).write_text(f"{step}\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune(keep=final)
            except OSError as e:
                failure = integrity.describe(e)
        self._raise_if_failed(step, tmp, integrity.all_gather(failure))
        return final

    def _raise_if_failed(self, step: int, tmp: Path, failures: list) -> None:
        """Collective, like every caller: raise the same CheckpointError on every rank if any failed."""
        failures = [f for f in failures if f]
        if failures:
            message = integrity.save_failure(self.root, tmp, step, failures, self.latest()) if _rank() == 0 else None
            raise CheckpointError(integrity.all_gather(message)[0])

    def _prune(self, keep: Path) -> None:
        if self.cfg.keep_last > 0:
            for p in self.complete()[: -self.cfg.keep_last]:
                if p != keep:
                    shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------- load
    def resolve(self) -> Path | None:
        """The checkpoint :meth:`load` would read first (``None``: start fresh), per ``cfg.resume``."""
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
        """Collective. Loads model (+ optimizer, scheduler, this rank's RNG) per ``cfg.resume``;
        returns the saved ``extra`` dict, or ``None`` when starting fresh.

        ``auto``: the newest complete checkpoint; a damaged one (its files do not match its
        manifest, or a small file does not parse) is named, moved aside to ``step_N.broken`` and
        the previous one is tried. ``none``: start fresh; checkpoints already in ``dir`` are moved
        to ``dir/superseded-<time>/`` (so that this run's are neither pruned in their favour nor
        mixed with them on resume). ``PATH``: that checkpoint; damaged -> CorruptCheckpointError.

        ``check(path, extra)``, if given, runs before any tensor is read (e.g. to compare the
        saved config with this run's and raise a readable CheckpointError)."""
        r = str(self.cfg.resume)
        if r == "none":
            self._set_aside_previous()
            return None
        if r != "auto":
            return self._load(check_complete(r), model, optimizer, scheduler, check, restore_rng=True)
        moved = []
        while (path := self.latest()) is not None:
            try:
                extra = self._load(path, model, optimizer, scheduler, check, restore_rng=True)
            except CorruptCheckpointError as err:
                moved.append(self._move_aside(err))
                continue
            if moved and _rank() == 0:
                print(f"[twotower] resumed from {path} (the newest intact checkpoint)", flush=True)
            return extra
        if moved:
            raise CheckpointError(f"no intact checkpoint left in {self.root}: the damaged ones were moved aside "
                                  f"({', '.join(str(p) for p in moved)}). Relaunch to start fresh, or pass "
                                  "checkpoint.resume=PATH")
        return None

    def _move_aside(self, err: CorruptCheckpointError) -> Path:
        def move() -> Path:
            target = integrity.move_aside(err.path)
            print(f"[twotower] {err}; moved it aside to {target} (kept, not deleted) and falling back to the "
                  "previous complete checkpoint", flush=True)
            return target
        return _on_rank0(f"{err}; moving it aside failed", move)

    def _set_aside_previous(self) -> None:
        def move() -> None:
            moved = integrity.set_aside_all(self.root)
            if moved:
                dest, names = moved
                print(f"[twotower] checkpoint.resume=none: starting fresh; the {len(names)} checkpoint folder(s) "
                      f"already in {self.root} ({names[0]} .. {names[-1]}) were moved to {dest} (kept; never "
                      "resumed or pruned)", flush=True)
        if self.root.is_dir():
            _on_rank0(f"checkpoint.resume=none: could not move the checkpoints in {self.root} aside", move)

    def load_weights(self, model, path: str | Path) -> dict:
        """Collective. Only the model's weights from the checkpoint ``path`` (or the newest under
        it: ``init_from``); returns its saved ``extra`` dict."""
        return self._load(find_checkpoint(path), model, None, None, None, restore_rng=False)

    def _read_verified(self, path: Path, scheduler: bool, rng: bool, checksums: bool) -> dict:
        """Collective: every rank checks its share of the files and reads its small files; every
        rank raises the same CorruptCheckpointError when any rank found a problem."""
        out, problems = integrity.read_small_files(path, _rank(), _world(), scheduler=scheduler, rng=rng,
                                                   checksums=checksums)
        found = sorted({tuple(p) for part in integrity.all_gather(problems) for p in part})
        if found:
            raise CorruptCheckpointError(path, found)
        return out

    def _load(self, path: Path, model, optimizer, scheduler, check, restore_rng: bool) -> dict:
        from megatron.core import dist_checkpointing

        from twotower.model.sharding import context_fingerprint, copy_loaded, sharded_tensor_targets

        check_complete(path)
        small = self._read_verified(path, scheduler is not None, restore_rng, checksums=optimizer is not None)
        if check is not None:
            check(path, small["extra.json"]["extra"])
        model_sd = model_sharded_state_dict(model)
        targets = sharded_tensor_targets(model_sd)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=self._meta())
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except integrity.IO_ERRORS as e:  # megatron's CheckpointingException, torch's CheckpointException
            if isinstance(e, CheckpointError):
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if "mismatch" in ln or "missing" in ln.lower()]
            raise CheckpointError(f"checkpoint {path} does not fit this model/layout or could not be read: "
                                  f"{lines[0] if lines else integrity.describe(e)[0]}") from e
        copy_loaded(targets, loaded["model"])
        for c in _chunks(model):
            if hasattr(c, "context_tower") and "context_fingerprint" in loaded["model"]:
                saved, now = loaded["model"]["context_fingerprint"], context_fingerprint(c.context_tower)
                if any(abs(saved[k] - now[k]) > 1e-9 * max(1.0, abs(now[k])) for k in saved):
                    raise CheckpointError(f"checkpoint {path}: the loaded context tower differs from the one "
                                          f"the checkpoint was trained with (fingerprint {now} != {saved}); "
                                          "load the same backbone before resuming")
        if optimizer is not None:
            # the saved param groups carry the LR, min LR, betas... of the run that saved them: this
            # run's configuration applies from the saved step on (README), so put its values back
            configured = [{k: g[k] for k in _GROUP_CONFIG_KEYS if k in g} for g in optimizer.param_groups]
            optimizer.load_state_dict(loaded["optimizer"])
            for group, values in zip(optimizer.param_groups, configured):
                group.update(values)
        if scheduler is not None and small.get("scheduler.pt") is not None:
            scheduler.load_state_dict(small["scheduler.pt"])
        if small["rng"] is not None:
            _set_rng_state(small["rng"])
        _barrier()
        return small["extra.json"]["extra"]
