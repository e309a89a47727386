"""Decoding: AR mode equals HF greedy generation; diffusion modes commit as specified."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import tiny_hf_model

from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.decoding import (
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
    place_towers_on_devices,
)
from twotower.model.hf_import import load_hf_backbone
from twotower.model.two_tower import TwoTowerConfig, build_two_tower

MASK = 3


@pytest.fixture
def pair(megatron_world1):
    hf = tiny_hf_model("all_types", seed=3)
    cfg = BackboneConfig.from_hf(hf.config)
    model = build_two_tower(cfg, ParallelConfig(attention_backend="sdpa", ssm_backend="torch"),
                            TwoTowerConfig(block_size=4, mask_token_id=MASK))
    load_hf_backbone(model.context_tower, hf)
    model.init_denoiser_from_context()
    return hf, model


def test_ar_mode_equals_hf_greedy_generate(pair):
    hf, model = pair
    prompt = torch.randint(4, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = generate_ar(model, prompt, max_new_tokens=9)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9, pad_token_id=0)
    assert torch.equal(ours.sequences, ref)
    assert ours.nfe == 9 and ours.new_tokens == 9


@pytest.mark.parametrize("gamma,expect_nfe", [(2.0, 12), (0.0, 3)])
def test_confidence_threshold_sets_tokens_per_step(pair, gamma, expect_nfe):
    _, model = pair
    prompt = torch.randint(4, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate_mask_diffusion(model, prompt, max_new_tokens=12, block_size=4, steps_per_block=4,
                                  mask_token_id=MASK, confidence_threshold=gamma)
    # gamma > 1: only the single most confident token per step; gamma = 0: a whole block per step
    assert out.nfe == expect_nfe and out.new_tokens == 12
    assert out.sequences.shape == (2, 17) and not (out.sequences == MASK).any()
    assert torch.equal(out.sequences[:, :5], prompt)


def test_threshold_compares_the_models_probability(pair):
    """The first step commits exactly the masked positions whose softmax probability (the
    model's, temperature 1) reaches gamma; gamma is set between the observed confidences."""
    _, model = pair
    S = 8
    prompt = torch.randint(4, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, cache = model.context_forward(prompt)
        conf = torch.softmax(model.denoise_block(torch.full((1, S), MASK), torch.ones(1), cache).float(), -1).amax(-1)
    ordered = conf[0].sort(descending=True).values
    gamma = float(ordered[2:4].mean())  # between the 3rd and 4th most confident: 3 pass
    assert float(ordered[0]) < 0.999  # a random tiny model is not certain: the test can tell
    seen = []
    inner = model.denoise_block

    def spy(block, t, cache):
        seen.append(block.clone())
        return inner(block, t, cache)

    model.denoise_block = spy
    generate_mask_diffusion(model, prompt, max_new_tokens=S, block_size=S, steps_per_block=S,
                            mask_token_id=MASK, confidence_threshold=gamma)
    assert int((seen[1] != MASK).sum()) == 3
    assert torch.equal(seen[1] != MASK, conf >= gamma)


def test_each_step_commits_the_denoisers_argmax(pair):
    """One block, gamma=0: the committed block is the argmax of one denoiser call on all-masks."""
    _, model = pair
    prompt = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    out = generate_mask_diffusion(model, prompt, max_new_tokens=4, block_size=4, mask_token_id=MASK,
                                  confidence_threshold=0.0)
    with torch.no_grad():
        _, cache = model.context_forward(prompt)
        logits = model.denoise_block(torch.full((1, 4), MASK), torch.ones(1), cache)
    assert torch.equal(out.sequences[:, 6:], logits.argmax(-1))


def test_steps_per_block_bounds_the_work(pair):
    _, model = pair
    prompt = torch.randint(4, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    out = generate_mask_diffusion(model, prompt, max_new_tokens=8, block_size=8, steps_per_block=2,
                                  mask_token_id=MASK, confidence_threshold=2.0)
    assert out.nfe == 2 and not (out.sequences == MASK).any()


def test_mock_ar_commits_one_token_per_step_left_to_right(pair):
    _, model = pair
    prompt = torch.randint(4, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    out = generate_mock_ar(model, prompt, max_new_tokens=8, block_size=4, mask_token_id=MASK)
    assert out.nfe == 8 and out.tokens_per_nfe == 1.0 and not (out.sequences == MASK).any()
    # the first token of a block is the denoiser's argmax at position 0 of an all-masked block
    with torch.no_grad():
        _, cache = model.context_forward(prompt)
        first = model.denoise_block(torch.full((2, 4), MASK), torch.ones(2), cache)[:, 0].argmax(-1)
    assert torch.equal(out.sequences[:, 5], first)


def test_eos_stops_and_pads(pair):
    _, model = pair
    prompt = torch.randint(4, 96, (1, 5), generator=torch.Generator().manual_seed(5))
    first = generate_ar(model, prompt, max_new_tokens=1).sequences[0, -1].item()
    out = generate_ar(model, prompt, max_new_tokens=6, eos_token_id=first)
    assert out.sequences.shape[1] == 6 and out.sequences[0, -1] == first


def test_towers_on_devices(pair):
    _, model = pair
    place_towers_on_devices(model, "cpu", "cpu")
    out = generate_mask_diffusion(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, block_size=4,
                                  mask_token_id=MASK)
    assert out.sequences.shape == (1, 7)
