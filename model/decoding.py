"""Decoding from one TwoTower checkpoint in the release's three modes (spec release.md §8-9).

Stage: inference. Input: a ``TwoTowerModel`` and prompts ``input_ids [b, P]``. Output:
``GenerationOutput``: ``sequences [b, P + n]`` (prompt + every generated token, as the release
returns them: a block that contains eos is kept whole), the denoiser forward count (NFE), wall
time. Names, defaults and rules are the released remote code's:

* ``generate_mask_diffusion``: per block of ``block_size`` positions, all [MASK] at first; at
  step k of T = ``steps_per_block`` the denoiser sees the block at time t = the masked fraction
  of the whole batch, the mask token's logit is removed (SUBS), every masked position gets a
  prediction (greedy, or Gumbel-max at ``temperature``) and a confidence (its probability at
  temperature 1). Commit ``min(max(c, ceil(n / (T - k))), n)`` of the n masked positions (c =
  the count with confidence strictly above gamma, at least 1; the last step commits all) and
  re-mask the least confident rest. After each block the context tower consumes it (block-wise
  extension); decoding stops after a block in which any row emitted eos.
* ``generate_mock_ar``: the release's plumbing mode. The denoiser, without time conditioning,
  re-reads the newest token from the context's caches *before* that token (Mamba states "S-2",
  K/V without the last position) and predicts the next one; the context tower then consumes it
  token by token. With a denoiser that is a copy of the backbone it equals ``generate_ar``.
* ``generate_ar``: the context tower alone (greedy or temperature with top-k then top-p).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from twotower.model.cache import TowerCache

#: The release removes the mask token from the denoiser's distribution with this logit.
SUBS_LOGIT = -1e12


@dataclass
class GenerationOutput:
    sequences: torch.Tensor
    """``[b, P + n]`` prompt followed by the generated tokens."""
    new_tokens: int
    nfe: int
    """Forward passes of the generating tower (denoiser for diffusion / mock-AR, context for AR)."""
    seconds: float

    @property
    def tokens_per_nfe(self) -> float:
        return self.new_tokens / max(self.nfe, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def _noise(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=like.device)
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``[b, V]`` -> ``[b]``: greedy at ``temperature <= 0``; else softmax(logits / T) restricted to
    the ``top_k`` best, then to the smallest set with probability >= ``top_p``, sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # inverse-CDF sampling with an explicit generator (works for CPU and CUDA generators alike)
    u = _noise((probs.shape[0], 1), probs, generator)
    return torch.searchsorted(probs.cumsum(-1), u.clamp(max=1 - 1e-7)).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def commit_counts(n_masked: torch.Tensor, n_confident: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """How many of a row's ``n_masked`` positions to commit at ``step`` of ``steps`` (the release's
    rule): all at the last step; else ``min(max(c, ceil(n / (T - k))), n)``, ``c = max(n_confident, 1)``."""
    if step == steps - 1:
        return n_masked
    c = torch.where(n_confident > 0, n_confident, torch.ones_like(n_confident))
    m = torch.ceil(n_masked.float() / max(1, steps - step)).long()
    return torch.minimum(torch.maximum(c, m), n_masked)


@torch.no_grad()
def generate_mask_diffusion(model, input_ids: torch.Tensor, max_new_tokens: int = 128, block_size: int = 16,
                            steps_per_block: int = 16, mask_token_id: int = 3, temperature: float = 0.0,
                            confidence_threshold: float = 0.9, eos_token_id: int | None = None,
                            generator: torch.Generator | None = None,
                            step_callback: Callable[[int, int, torch.Tensor], None] | None = None,
                            stop: Callable[[torch.Tensor], bool] | None = None) -> GenerationOutput:
    """Block-wise confidence-threshold mask diffusion (module docstring). ``step_callback(block,
    step, xt)`` is called after every denoiser step; ``stop(generated [b, n])`` after every block
    (after the context consumed it, like the eos check): True ends decoding (stop strings)."""
    if block_size < 1 or steps_per_block < 1:
        raise ValueError(f"block_size={block_size} and steps_per_block={steps_per_block} must be >= 1")
    if max_new_tokens % block_size:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be a multiple of block_size={block_size} "
                         f"(e.g. {math.ceil(max_new_tokens / block_size) * block_size})")
    model.eval()
    t0 = time.perf_counter()
    b, dev = input_ids.shape[0], input_ids.device
    _, cache = model.context_forward(input_ids)
    blocks, nfe = [], 0
    for blk in range(max_new_tokens // block_size):
        xt = torch.full((b, block_size), mask_token_id, dtype=input_ids.dtype, device=dev)
        for k in range(steps_per_block):
            masked = xt == mask_token_id
            if not bool(masked.any()):
                break
            t = masked.float().mean().expand(b)  # one time for the batch: its masked fraction
            logits = model.denoise_block(xt, t, cache).float().to(dev)
            nfe += 1
            logits[..., mask_token_id] = SUBS_LOGIT
            logp = logits.log_softmax(-1)
            if temperature <= 0:
                pred = logp.argmax(-1)
            else:  # Gumbel-max: a sample of softmax(logits / T) without the mask token
                gumbel = -torch.log(-torch.log(_noise(logits.shape, logits, generator).clamp_min(1e-20)))
                pred = ((logits / temperature).log_softmax(-1) + gumbel).argmax(-1)
            conf = logp.gather(-1, pred[..., None]).squeeze(-1).exp()
            conf = torch.where(masked, conf, torch.full_like(conf, float("inf")))
            n = masked.sum(1)
            commit = commit_counts(n, (masked & (conf > confidence_threshold)).sum(1), k, steps_per_block)
            xt = torch.where(masked, pred, xt)
            # re-mask the n - commit least confident of the positions that were masked at this step
            rank = conf.argsort(dim=1, stable=True).argsort(dim=1)
            xt = xt.masked_fill(masked & (rank < (n - commit)[:, None]), mask_token_id)
            if step_callback is not None:
                step_callback(blk, k, xt)
        blocks.append(xt)
        _, cache = model.context_forward(xt, cache, block_wise=True)  # the context consumes the block
        if eos_token_id is not None and bool((xt == eos_token_id).any()):
            break
        if stop is not None and stop(torch.cat(blocks, dim=1)):
            break
    return _output(input_ids, blocks, nfe, t0)


def _prefill_two_pass(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, TowerCache, TowerCache]:
    """The release's prefill: tokens ``[0, P-1)`` then the last one. Returns (last logits [b, V],
    cache before the last token ("S-2"), cache after it ("S-1"))."""
    before = TowerCache.empty(len(model.context_tower.layers))
    if input_ids.shape[1] > 1:
        _, before = model.context_forward(input_ids[:, :-1])
    logits, after = model.context_forward(input_ids[:, -1:], before, return_logits=True)
    return logits[:, -1], before, after


@torch.no_grad()
def generate_mock_ar(model, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                     generator: torch.Generator | None = None,
                     stop: Callable[[torch.Tensor], bool] | None = None) -> GenerationOutput:
    """One token per denoiser step, no time conditioning, from the context's caches shifted back
    one token (module docstring). ``stop(generated [b, n])``: as for ``generate_ar``."""
    model.eval()
    t0 = time.perf_counter()
    _, before, after = _prefill_two_pass(model, input_ids)
    newest, out = input_ids[:, -1:], []
    for _ in range(max_new_tokens):
        logits = model.denoise_block(newest, None, before, block_wise=False, subs=False)[:, -1].float()
        tok = sample_next(logits.to(input_ids.device), temperature, top_k, top_p, generator)[:, None]
        out.append(tok)
        if eos_token_id is not None and bool((tok == eos_token_id).any()):
            break
        if stop is not None and stop(torch.cat(out, dim=1)):
            break
        before, newest = after, tok
        _, after = model.context_forward(tok, after)
    return _output(input_ids, out, len(out), t0)


@torch.no_grad()
def generate_ar(model, input_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                generator: torch.Generator | None = None,
                stop: Callable[[torch.Tensor], bool] | None = None) -> GenerationOutput:
    """Plain AR decoding with the context tower and its caches. ``stop(generated [b, n])`` is
    called after every token: True ends decoding (stop strings; not part of the release)."""
    model.eval()
    t0 = time.perf_counter()
    logits, _, cache = _prefill_two_pass(model, input_ids)
    out, nfe = [], 1
    for i in range(max_new_tokens):
        tok = sample_next(logits.float().to(input_ids.device), temperature, top_k, top_p, generator)[:, None]
        out.append(tok)
        if eos_token_id is not None and bool((tok == eos_token_id).any()):
            break
        if stop is not None and stop(torch.cat(out, dim=1)):
            break
        if i + 1 < max_new_tokens:
            logits, cache = model.context_forward(tok, cache, return_logits=True)
            logits, nfe = logits[:, -1], nfe + 1
    return _output(input_ids, out, nfe, t0)


def _output(prompt: torch.Tensor, parts: list[torch.Tensor], nfe: int, t0: float) -> GenerationOutput:
    out = torch.cat([prompt, *parts], dim=1)
    return GenerationOutput(out, out.shape[1] - prompt.shape[1], nfe, time.perf_counter() - t0)


def place_towers_on_devices(model, ctx_device: str | torch.device, den_device: str | torch.device):
    """Context tower on one device; the denoiser and its time conditioning on another (2 GPUs).

    ``denoise_block`` copies the context's caches to the denoiser's device once per call."""
    model.context_tower.to(ctx_device)
    model.denoiser_tower.to(den_device)
    for module in model.time_conditioning_modules().values():
        module.to(den_device)
    return model


__all__ = ["GenerationOutput", "commit_counts", "generate_ar", "generate_mask_diffusion", "generate_mock_ar",
           "place_towers_on_devices", "sample_next"]
