"""Decoding from one TwoTower checkpoint in three modes.

Stage: inference. Input: a ``TwoTowerModel`` and prompts ``input_ids [b, P]``. Output:
``GenerationOutput`` with the generated ids ``[b, P + n]`` and counters (denoiser forwards
= NFE, tokens per NFE, wall time, tokens/s).

* ``generate_mask_diffusion``: each block of S positions starts as [MASK]; per step the
  denoiser predicts every masked position; positions whose confidence (probability of the
  chosen token) is >= gamma are committed, and at least the single most confident one (plus
  enough to finish within ``steps_per_block``); when the block is full the context tower
  consumes it (KV cache + Mamba states) and the next block starts. Lower gamma: more tokens
  per step, faster, lower quality.
* ``generate_mock_ar``: the denoiser commits exactly one token per step, left to right.
* ``generate_ar``: the context tower alone, standard autoregressive decoding with its cache.

The diffusion time fed to the denoiser is the fraction of the block still masked (under the
log-linear schedule the expected mask fraction at time t is t).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from twotower.model.cache import TowerCache


@dataclass
class GenerationOutput:
    sequences: torch.Tensor
    """``[b, P + n]`` prompt followed by the generated tokens (``eos`` then padding, if any)."""
    new_tokens: int
    nfe: int
    """Forward passes of the generating tower (denoiser, or context for AR)."""
    seconds: float

    @property
    def tokens_per_nfe(self) -> float:
        return self.new_tokens / max(self.nfe, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """Chosen tokens and their confidence; greedy when ``temperature == 0``.

    The confidence is the model's probability of the chosen token (softmax at temperature 1
    for greedy; at the sampling temperature otherwise): a greedy "temperature 0" softmax
    would be one-hot and every position would pass any threshold."""
    if temperature <= 0:
        probs = torch.softmax(logits.float(), dim=-1)
        conf, tok = probs.max(dim=-1)
        return tok, conf
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    conf = probs.gather(-1, tok[..., None])[..., 0]
    return tok, conf


def _finish(prompt, blocks, eos, t0, nfe) -> GenerationOutput:
    out = torch.cat([prompt] + blocks, dim=1) if blocks else prompt
    gen = out[:, prompt.shape[1]:]
    if eos is not None and gen.numel():
        after = (gen == eos).long().cumsum(1) > 0
        after = after & ~((gen == eos) & ((gen == eos).long().cumsum(1) == 1))  # keep the first eos
        gen = gen.masked_fill(after, eos)
        out = torch.cat([prompt, gen], dim=1)
    return GenerationOutput(out, gen.shape[1], nfe, time.perf_counter() - t0)


@torch.no_grad()
def generate_mask_diffusion(model, input_ids: torch.Tensor, max_new_tokens: int, block_size: int = 16,
                            steps_per_block: int = 16, mask_token_id: int = 3, temperature: float = 0.0,
                            confidence_threshold: float = 0.8, eos_token_id: int | None = None,
                            generator: torch.Generator | None = None, mock_ar: bool = False) -> GenerationOutput:
    if steps_per_block < 1 or block_size < 1:
        raise ValueError("block_size and steps_per_block must be >= 1")
    model.eval()
    t0 = time.perf_counter()
    b, dev = input_ids.shape[0], input_ids.device
    _, cache = model.context_forward(input_ids)
    blocks, nfe, done = [], 0, torch.zeros(b, dtype=torch.bool, device=dev)
    while sum(x.shape[1] for x in blocks) < max_new_tokens and not bool(done.all()):
        S = min(block_size, max_new_tokens - sum(x.shape[1] for x in blocks))
        block = torch.full((b, S), mask_token_id, dtype=input_ids.dtype, device=dev)
        for step in range(S if mock_ar else steps_per_block):
            masked = block == mask_token_id
            if not bool(masked.any()):
                break
            t = masked.float().mean(dim=1)
            tok, conf = _pick(model.denoise_block(block, t, cache), temperature, generator)
            nfe += 1
            conf = conf.masked_fill(~masked, -1.0)
            if mock_ar:  # exactly one token per step, left to right
                first = masked.float().argmax(dim=1)
                commit = torch.zeros_like(masked).scatter_(1, first[:, None], True) & masked
            else:
                commit = masked & (conf >= confidence_threshold)
                # at least the most confident one, and enough to finish within steps_per_block
                need = torch.ceil(masked.sum(1).float() / (steps_per_block - step)).long().clamp(min=1)
                ranks = conf.argsort(dim=1, descending=True).argsort(dim=1)
                commit |= masked & (ranks < need[:, None])
            block = torch.where(commit, tok, block)
        blocks.append(block)
        if eos_token_id is not None:
            done |= (block == eos_token_id).any(dim=1)
        _, cache = model.context_forward(block, cache)  # the context tower consumes the block
    return _finish(input_ids, blocks, eos_token_id, t0, nfe)


def generate_mock_ar(model, input_ids: torch.Tensor, max_new_tokens: int, **kw) -> GenerationOutput:
    """The denoiser commits exactly one token per step (left to right)."""
    return generate_mask_diffusion(model, input_ids, max_new_tokens, mock_ar=True, **kw)


@torch.no_grad()
def generate_ar(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                eos_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationOutput:
    """Plain AR decoding with the context tower and its KV cache + Mamba states."""
    model.eval()
    t0 = time.perf_counter()
    logits, cache = model.context_forward(input_ids, return_logits=True)
    out, nfe = [], 1
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        tok, _ = _pick(logits[:, -1], temperature, generator)
        out.append(tok[:, None])
        if eos_token_id is not None:
            done |= tok == eos_token_id
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits, cache = model.context_forward(tok[:, None], cache, return_logits=True)
            nfe += 1
    return _finish(input_ids, out, eos_token_id, t0, nfe)


def place_towers_on_devices(model, ctx_device: str | torch.device, den_device: str | torch.device):
    """Put the context tower on one device and the denoiser (+ adaLN) on another (e.g. 2 GPUs).

    ``denoise_block`` moves the cache and its inputs to the denoiser's device as needed.
    """
    model.context_tower.to(ctx_device)
    model.denoiser_tower.to(den_device)
    model.adaln.to(den_device)
    return model


__all__ = ["GenerationOutput", "TowerCache", "generate_ar", "generate_mask_diffusion", "generate_mock_ar",
           "place_towers_on_devices"]
