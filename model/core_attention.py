"""Core attention backends: ``softmax(q k^T / sqrt(d) + mask) v`` with GQA.

Stage: inside every attention layer, after the QKV projection. Inputs
``q: [b, nh, sq, d]``, ``k, v: [b, ng, sk, d]`` (``nh % ng == 0``), and a ``MaskSpec``
describing which keys each query may see. Output ``[b, nh, sq, d]``.

A mask is described once, as data (``MaskSpec``), and each backend materialises it in
its own form: the SDPA backend as a dense boolean ``[sq, sk]`` mask (per query chunk for
training block diffusion, below), the FlexAttention backend as a sparse ``BlockMask`` built
from a ``mask_mod``. The backend is chosen once per model (``build_core_attention``); layers
never branch on it.

Mask kinds (``i`` = query index, ``j`` = key index):

======================  ==========================================================
``causal(offset)``      ``j <= i + offset``; keys = ``offset`` cached keys + queries
``full``                every key (a decoding block over a clean prefix)
``block_diffusion(S,P)``keys = ``[P clean context keys ; sq noisy keys]``; query ``i``
                        in block ``b = i // S`` sees context keys ``j < b*S`` and noisy
                        keys of its own block (bidirectional inside the block).
                        BD3-LM's M_OBC + M_BD masks without its clean self-attention.
======================  ==========================================================

Block-diffusion chunking (SDPA backend). In training ``P == sq == L`` and ``sk == 2L``;
one dense ``[L, 2L]`` call scores ``2L^2`` entries, ~3/4 of them masked (4x a causal
``L^2/2``). Instead the queries are split into chunks of whole blocks, ``[a, e)``, of
``chunk_len = max(S, round_up(ceil(L / n_chunks), S))`` queries (the last may be shorter). A
chunk attends ``cat(context keys [0, a_max), own keys [a, e))`` with ``a_max`` the start of its
last block (the longest context prefix any of its queries may see) under a small cached
boolean mask, one SDPA call per chunk. Exact (same keys visible, masked ones contribute zero)
and costs ``sum_chunks chunk_len * (a_max + chunk_len)`` score entries, about
``L^2/2 + 1.5 L * chunk_len`` (``~0.69 L^2`` for 8 chunks) instead of ``2L^2``.
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
        """The same rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``. The causal offset is a
        0-d tensor, not a Python int: a compiled FlexAttention then sees it as an input and does not
        recompile for every decoding offset."""
        if self.kind == "causal":
            off = torch.tensor(self.offset, dtype=torch.int64)

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


BD_CHUNKS = 8  # default number of query chunks for the block-diffusion SDPA path


class SDPACoreAttention:
    """``F.scaled_dot_product_attention``: exact, runs everywhere. Dense ``[sq, sk]`` mask, except
    the training block-diffusion mask (``context_len == sq``, ``sk == 2 sq``), which is computed
    in ``n_chunks`` query chunks of whole blocks (see the module docstring)."""

    name = "sdpa"

    def __init__(self, n_chunks: int = BD_CHUNKS):
        if n_chunks <= 0:
            raise ValueError(f"n_chunks={n_chunks} must be positive")
        self.n_chunks = n_chunks

    def __call__(self, q, k, v, mask: MaskSpec) -> torch.Tensor:
        sq, sk = q.shape[-2], k.shape[-2]
        gqa = q.shape[1] != k.shape[1]
        if mask.kind == "causal" and mask.offset == 0 and sq == sk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if mask.kind == "block_diffusion" and mask.context_len == sq and sk == 2 * sq:
            return self._block_diffusion(q, k, v, mask, gqa)
        dense = _cached_dense(mask, sq, sk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)

    def _block_diffusion(self, q, k, v, mask: MaskSpec, gqa: bool) -> torch.Tensor:
        """Chunked block-diffusion attention: keys ``[L context ; L own]``, one call per chunk."""
        L = q.shape[-2]
        chunks = _bd_chunks(mask, L, self.n_chunks, q.device)
        lens = [e - a for a, e, _, _ in chunks]
        (k_ctx, k_own), (v_ctx, v_own) = k.split(L, dim=2), v.split(L, dim=2)
        # split (not per-chunk slicing): its backward is one cat instead of a zero-fill per chunk
        parts = zip(q.split(lens, 2), k_own.split(lens, 2), v_own.split(lens, 2), chunks)
        out = []
        for qc, ko, vo, (_, _, a_max, m) in parts:
            kc = torch.cat([k_ctx[:, :, :a_max], ko], dim=2)
            vc = torch.cat([v_ctx[:, :, :a_max], vo], dim=2)
            out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=m, enable_gqa=gqa))
        return torch.cat(out, dim=2)


class FlexCoreAttention:
    """FlexAttention with a sparse ``BlockMask``: skips fully-masked tiles (the block-diffusion
    mask is ~75% empty at long L). Compiled on CUDA; eager (correct but slow) on CPU.

    Compiled once, with dynamic shapes: decoding calls it with a new key length every block (and
    a new causal offset, a tensor inside the mask, see ``MaskSpec.mask_mod``); a static compile
    would recompile for every (offset, length) pair. ``full`` masks (a decoding block over its
    prefix) need no block mask at all."""

    name = "flex"

    def __init__(self, compile: bool | None = None):
        from torch.nn.attention.flex_attention import flex_attention

        self._compile = torch.cuda.is_available() if compile is None else compile
        self._fn = torch.compile(flex_attention, dynamic=True) if self._compile else flex_attention

    def __call__(self, q, k, v, mask: MaskSpec) -> torch.Tensor:
        block_mask = None
        if mask.kind != "full":
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
def _bd_chunks(mask: MaskSpec, L: int, n_chunks: int, device: torch.device):
    """``(a, e, a_max, mask)`` per query chunk ``[a, e)`` of whole blocks; ``mask`` is the boolean
    ``[e - a, a_max + e - a]`` rule over ``[context keys < a_max ; own keys a..e)``, or None when
    every one of those keys is visible (a single-block chunk)."""
    s = mask.block_size
    per = -(-L // n_chunks)  # ceil(L / n_chunks)
    n = max(s, -(-per // s) * s)  # chunk_len: rounded up to whole blocks
    chunks = []
    for a in range(0, L, n):
        e = min(a + n, L)
        a_max = (e - 1) // s * s  # start of the chunk's last block
        q_block = torch.arange(a, e, device=device)[:, None] // s
        ctx = torch.arange(a_max, device=device)[None, :] < q_block * s
        own = torch.arange(a, e, device=device)[None, :] // s == q_block
        m = torch.cat([ctx, own], dim=1)
        chunks.append((a, e, a_max, None if bool(m.all()) else m))
    return tuple(chunks)


@lru_cache(maxsize=32)
def _cached_block_mask(mask: MaskSpec, sq: int, sk: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    _check_len(mask, sq, sk)
    return create_block_mask(mask.mask_mod(), B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=str(device))


def _check_len(mask: MaskSpec, sq: int, sk: int) -> None:
    expect = mask.key_len(sq)
    if expect >= 0 and expect != sk:
        raise ValueError(f"{mask}: expects {expect} keys for {sq} queries, got {sk}")
