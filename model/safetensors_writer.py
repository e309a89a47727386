"""Streaming writer of a sharded Hugging Face safetensors checkpoint.

Stage: export. Input: ``(name, tensor)`` pairs one at a time (e.g. one layer's tensors from
``released_format.iter_released_tensors``). Output in ``folder``: ``model-0000k-of-0000n.safetensors``
files of at most ``max_shard_bytes`` each (a single larger tensor gets a shard of its own) and
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), the layout
``transformers`` and ``huggingface_hub`` read.

Memory: a shard is written as soon as the next tensor would overflow it, so the writer holds at
most one shard plus the tensor being added.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Hugging Face's default ``max_shard_size``.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


class ShardedSafetensorsWriter:
    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 dtype: torch.dtype | None = None, keep_dtype: tuple[str, ...] = ()):
        """``dtype``: cast floating tensors to it, except names ending with ``keep_dtype``."""
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.dtype, self.keep_dtype = dtype, keep_dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"{name} was written twice")
        t = tensor.detach()
        if self.dtype is not None and t.is_floating_point() and not name.endswith(self.keep_dtype):
            t = t.to(self.dtype)
        t = t.contiguous().cpu()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size
        self.peak_pending_bytes = max(self.peak_pending_bytes, self._pending_bytes)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self._shards)
        save_file(self._pending, str(self.folder / f"shard-{k:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict:
        """Write the last shard, name the shards ``model-k-of-n`` and write the index; returns it."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for k, names in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{k:05d}.tmp").replace(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return index
