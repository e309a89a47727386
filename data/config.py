"""``DataConfig``: what the loader reads and how (stage: configuration).

Input: values from a Hydra YAML in ``conf/data/`` (or keyword arguments). Output: a validated
dataclass; every invalid value raises with a message that says how to fix it. The YAML files only
choose values; the meaning of every field is documented here.

Hydra: call :func:`register` to store the schema as ``data/schema`` in the ConfigStore; nothing is
registered at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

ON_BAD_SAMPLE = ("error", "skip")
ON_DP_CHANGE = ("restart_epoch", "next_epoch", "error")
ON_PATH_CHANGE = ("error", "by_position")


@dataclass
class DatasetSpec:
    """One tokenized dataset of the training blend."""

    path: str = "???"
    """Directory written by twotower-tokenize (holds manifest.json and the shards)."""
    weight: float = 1.0
    """Relative sampling weight in the blend; weights are normalized to sum to 1."""


@dataclass
class DataConfig:
    """Data pipeline settings; see each field."""

    train: list[DatasetSpec] = field(default_factory=list)
    """Training blend: a list of ``{path, weight}``. Each sample is drawn from dataset i with
    probability weight_i / sum(weights)."""
    valid_path: str | None = None
    """Tokenized dataset directory whose ``valid`` split is the validation stream (often the same
    directory as a training dataset). None: no validation stream."""
    seq_len: int = 2048
    """Tokens per sample; must equal the ``seq_len`` in every manifest (re-tokenize to change it)."""
    num_workers: int = 2
    """DataLoader worker processes per data-parallel rank (0: read in the training process).
    Part of the resume state: changing it on resume is handled like a DP-size change."""
    shuffle_buffer: int = 1024
    """Samples per shuffle block: each block of consecutive samples of a worker is emitted in a
    seeded random order. Memory per worker ~ shuffle_buffer * seq_len * 4 bytes per dataset."""
    seed: int = 1234
    """Seed of every shuffle and blend choice; same seed + same layout = same batches."""
    vocab_size: int | None = None
    """The model's vocab size: datasets whose tokenizer vocab is larger are rejected up front,
    and every sample is checked for ids >= vocab_size. None disables both checks."""
    on_bad_sample: str = "error"
    """``error``: raise on a malformed sample, naming shard and key. ``skip``: log each bad sample
    (shard, key, reason) with a running count and continue."""
    on_dp_change: str = "restart_epoch"
    """What load_state_dict does when dp_size, num_workers or micro_batch_size differ from the
    saved state: ``restart_epoch`` (warn; every dataset restarts at the beginning of the oldest
    epoch still in progress, re-partitioned for the new layout: samples of that epoch already seen are
    seen again, none is skipped), ``next_epoch`` (warn; start the next epoch: the rest of the current
    epoch is skipped), or ``error``."""
    on_path_change: str = "error"
    """What resuming does when the checkpoint's loader state names other dataset paths than
    ``train``: ``error`` (refuse, naming both; ``twotower-train`` exits 5), or ``by_position``
    (the datasets moved: match them by their position in ``train`` and continue where the
    checkpoint left off, provided each one's shards, as its manifest lists them with their
    checksums, are those of the checkpoint's dataset; else refuse)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker (torch DataLoader prefetch_factor)."""

    def __post_init__(self) -> None:
        self.train = [d if isinstance(d, DatasetSpec) else DatasetSpec(**dict(d)) for d in self.train]
        if not self.train:
            raise ValueError("DataConfig.train is empty: give at least one {path: DIR, weight: 1.0}")
        for i, d in enumerate(self.train):
            if not d.path or d.path == "???":
                raise ValueError(
                    f"DataConfig.train[{i}].path is not set: point it to a twotower-tokenize output"
                )
            if not d.weight > 0:
                raise ValueError(f"DataConfig.train[{i}] ({d.path}): weight must be > 0, got {d.weight}")
        if self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len must be >= 1, got {self.seq_len}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(
                f"DataConfig.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"DataConfig.vocab_size must be >= 1 or null, got {self.vocab_size}")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(
                f"DataConfig.on_bad_sample={self.on_bad_sample!r}; choose one of {ON_BAD_SAMPLE}"
            )
        if self.on_dp_change not in ON_DP_CHANGE:
            raise ValueError(f"DataConfig.on_dp_change={self.on_dp_change!r}; choose one of {ON_DP_CHANGE}")
        if self.on_path_change not in ON_PATH_CHANGE:
            raise ValueError(
                f"DataConfig.on_path_change={self.on_path_change!r}; choose one of {ON_PATH_CHANGE}"
            )
        if self.prefetch_factor < 1:
            raise ValueError(f"DataConfig.prefetch_factor must be >= 1, got {self.prefetch_factor}")

    @classmethod
    def from_any(cls, cfg: Any) -> DataConfig:
        """Build from a DataConfig, a dict or an OmegaConf node (e.g. ``cfg.data`` of a Hydra run)."""
        if isinstance(cfg, cls):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # omegaconf comes with hydra; plain dicts work without it
            pass
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"DataConfig: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**cfg)


def register() -> None:
    """Store the schema in Hydra's ConfigStore as group ``data``, name ``schema`` (opt-in)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)
