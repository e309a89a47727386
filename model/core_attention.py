"""Core attention backends: ``softmax(q k^T / sqrt(d) + mask) v`` with GQA.

Stage: inside every attention layer, after the QKV projection. Inputs
``q: [b, nh, sq, d]``, ``k, v: [b, ng, sk, d]`` (``nh % ng == 0``), and a ``MaskSpec``
describing which keys each query may see. Output ``[b, nh, sq, d]``.

A mask is described once, as data (``MaskSpec``), and each backend materialises it in
its own form: the SDPA backend as a dense boolean ``[sq, sk]`` mask, the FlexAttention
backend as a sparse ``BlockMask`` built from a ``mask_mod``. The backend is chosen once
per model (``build_core_attention``); layers never branch on it.

Mask kinds (``i`` = query index, ``j`` = key index):

======================  ==========================================================
``causal(offset)``      ``j <= i + offset``; keys = ``offset`` cached keys + queries
``full``                every key (a decoding block over a clean prefix)
``block_diffusion(S,P)``keys = ``[P clean context keys ; sq noisy keys]``; query ``i``
                        in block ``b = i // S`` sees context keys ``j < b*S`` and noisy
                        keys of its own block (bidirectional inside the block).
                        BD3-LM's M_OBC + M_BD masks without its clean self-attention.
======================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees. Build with the class methods, not by hand."""

    kind: Literal["causal", "full", "block_diffusion"]
    offset: int = 0
    block_size: int = 0
    context_len: int = 0

    @classmethod
    def causal(cls, offset: int = 0) -> MaskSpec:
        return cls("causal", offset=offset)

    @classmethod
    def full(cls) -> MaskSpec:
        return cls("full")

    @classmethod
    def block_diffusion(cls, block_size: int, context_len: int) -> MaskSpec:
        if block_size <= 0:
            raise ValueError(f"block_diffusion mask: block_size={block_size} must be positive")
        return cls("block_diffusion", block_size=block_size, context_len=context_len)

    def key_len(self, q_len: int) -> int:
        """Number of keys this mask expects for ``q_len`` queries."""
        if self.kind == "causal":
            return q_len + self.offset
        if self.kind == "block_diffusion":
            return self.context_len + q_len
        return -1  # full: any

    def dense(self, q_len: int, k_len: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Boolean ``[q_len, k_len]`` (True = attend), or None when every key is visible."""
        if self.kind == "full":
            return None
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(k_len, device=device)[None, :]
        if self.kind == "causal":
            return j <= i + self.offset
        s, p = self.block_size, self.context_len
        q_block = i // s
        ctx = (j < p) & (j < q_block * s)
        own = (j >= p) & ((j - p) // s == q_block)
        return ctx | own

    def mask_mod(self):
        """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``."""
        if self.kind == "causal":
            off = self.offset

            def causal(b, h, q, kv):
                return kv <= q + off

            return causal
        if self.kind == "full":
            return None
        s, p = self.block_size, self.context_len

        def block_diffusion(b, h, q, kv):
            q_block = q // s
            ctx = (kv < p) & (kv < q_block * s)
            own = (kv >= p) & ((kv - p) // s == q_block)
            return ctx | own

        return block_diffusion


class SDPACoreAttention:
    """Dense-mask ``F.scaled_dot_product_attention``: exact, runs everywhere, O(sq * sk) mask."""

    name = "sdpa"

    def __call__(self, q, k, v, mask: MaskSpec) -> torch.Tensor:
        sq, sk = q.shape[-2], k.shape[-2]
        gqa = q.shape[1] != k.shape[1]
        if mask.kind == "causal" and mask.offset == 0 and sq == sk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        dense = _cached_dense(mask, sq, sk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)


class FlexCoreAttention:
    """FlexAttention with a sparse ``BlockMask``: skips fully-masked tiles (the block-diffusion
    mask is ~75% empty at long L). Compiled on CUDA; eager (correct but slow) on CPU."""

    name = "flex"

    def __init__(self, compile: bool | None = None):
        from torch.nn.attention.flex_attention import flex_attention

        self._compile = torch.cuda.is_available() if compile is None else compile
        self._fn = torch.compile(flex_attention, dynamic=False) if self._compile else flex_attention

    def __call__(self, q, k, v, mask: MaskSpec) -> torch.Tensor:
        block_mask = _cached_block_mask(mask, q.shape[-2], k.shape[-2], q.device)
        gqa = q.shape[1] != k.shape[1]
        return self._fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def build_core_attention(backend: str = "auto"):
    """Choose the core attention once: ``flex`` on CUDA for ``auto``, dense SDPA otherwise."""
    if backend == "auto":
        backend = "flex" if torch.cuda.is_available() else "sdpa"
    if backend == "sdpa":
        return SDPACoreAttention()
    if backend == "flex":
        return FlexCoreAttention()
    raise ValueError(f"parallel.attention_backend={backend!r}: use 'auto', 'sdpa' or 'flex'")


@lru_cache(maxsize=32)
def _cached_dense(mask: MaskSpec, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
    _check_len(mask, sq, sk)
    return mask.dense(sq, sk, device)


@lru_cache(maxsize=32)
def _cached_block_mask(mask: MaskSpec, sq: int, sk: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    _check_len(mask, sq, sk)
    mod = mask.mask_mod()
    if mod is None:
        def mod(b, h, q, kv):
            return q >= 0
    return create_block_mask(mod, B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=str(device))


def _check_len(mask: MaskSpec, sq: int, sk: int) -> None:
    expect = mask.key_len(sq)
    if expect >= 0 and expect != sk:
        raise ValueError(f"{mask}: expects {expect} keys for {sq} queries, got {sk}")
