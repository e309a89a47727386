"""``twotower-convert export-hf --verify``: reload an export with plain transformers and compare.

Stage: the end of an export, before the folder is moved into place (a failed check leaves the
previous folder untouched). Checks, each failing with the first offending name:

1. ``from_pretrained`` reports no missing or unexpected key;
2. every tensor equals ours after the export's dtype round trip;
3. with our weights rounded the same way, the context tower's logits on random tokens agree
   (<= 1e-4, fp32 compute), and for a TwoTower one greedy diffusion block gives the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch


class VerifyError(RuntimeError):
    pass


@torch.no_grad()
def verify_export(folder: Path, model, backbone_only: bool, dtype: torch.dtype, atol: float = 1e-4) -> dict:
    """Single process only (our model must be whole on this rank). Returns measured differences."""
    from transformers import AutoModelForCausalLM

    from twotower.model.decoding import generate_ar, generate_mask_diffusion
    from twotower.model.hf_import import HFWeights
    from twotower.model.released_format import iter_released_tensors

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise VerifyError("--verify needs a single-process export (run without torchrun)")
    hf, info = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=not backbone_only,
                                                    dtype=torch.float32, output_loading_info=True)
    hf.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise VerifyError(f"{folder}: transformers reports {bad}")
    # by normalised name: transformers' own NemotronH keeps fused experts under ``model.`` in memory
    theirs = HFWeights.from_state_dict(hf.state_dict(), str(folder))
    for name, ours in iter_released_tensors(model, backbone_only=backbone_only):
        key = name.removeprefix("backbone.")
        if theirs.shape(key) is None:
            raise VerifyError(f"{folder}: {name} is not a parameter of the reloaded {type(hf).__name__}")
        expect = ours if name.endswith("e_score_correction_bias") else ours.to(dtype)
        if not torch.equal(theirs.read(key).float(), expect.float()):
            raise VerifyError(f"{folder}: tensor {name} differs from the checkpoint's after the {dtype} round trip")
    for p in model.parameters():  # compare the functions on identical (rounded) weights
        p.data = p.data.to(dtype).to(p.dtype)
    vocab, S, mask = model.backbone.vocab_size, model.twotower.block_size, model.twotower.mask_token_id
    ids = torch.randint(4, vocab, (2, 2 * S), generator=torch.Generator().manual_seed(0))
    ours_logits, _ = model.context_forward(ids, return_logits=True)
    diff = (hf(input_ids=ids).logits.float() - ours_logits.float()).abs().max().item()
    if diff > atol:
        raise VerifyError(f"{folder}: context logits differ by {diff:.3g} (> {atol})")
    result = {"max_abs_logit_diff": diff}
    prompt = ids[:, :S]
    if backbone_only:
        ours = generate_ar(model, prompt, max_new_tokens=S).sequences
        got = hf.generate(prompt, max_new_tokens=S, min_new_tokens=S, do_sample=False, pad_token_id=0)
    else:
        ours = generate_mask_diffusion(model, prompt, max_new_tokens=S, block_size=S, steps_per_block=S,
                                       mask_token_id=mask).sequences
        got = hf.generate_mask_diffusion(prompt, max_new_tokens=S, block_size=S, steps_per_block=S,
                                         mask_token_id=mask)
    if not torch.equal(ours, got):
        raise VerifyError(f"{folder}: greedy {'AR' if backbone_only else 'diffusion'} tokens differ: "
                          f"checkpoint {ours[:, S:].tolist()} vs export {got[:, S:].tolist()}")
    return result
