"""Decoding: the release's rules (scripted fake denoiser), AR == HF generate, mock-AR == AR."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import tiny_hf_model

from twotower.model.config import BackboneConfig, ParallelConfig
from twotower.model.decoding import (
    commit_counts,
    generate_ar,
    generate_mask_diffusion,
    generate_mock_ar,
    place_towers_on_devices,
    sample_next,
)
from twotower.model.hf_import import load_hf_backbone
from twotower.model.two_tower import TwoTowerConfig, build_two_tower

MASK, V = 3, 8


# ------------------------------------------------------------------ scripted fake denoiser
class Scripted:
    """A stand-in TwoTowerModel: ``denoise_block`` returns logits whose temperature-1 SUBS
    probabilities are the scripted ``probs[call]`` ``[b, S, V]`` (mask column ignored)."""

    def __init__(self, probs: list[torch.Tensor]):
        self.probs, self.calls, self.extended = probs, [], []

    def eval(self):
        return self

    def context_forward(self, ids, cache=None, return_logits=False, block_wise=False):
        self.extended.append((ids.clone(), block_wise))
        return None, object()

    def denoise_block(self, xt, t, cache):
        self.calls.append((xt.clone(), t.clone()))
        p = self.probs[min(len(self.calls) - 1, len(self.probs) - 1)]
        return p.clamp_min(1e-30).log()


def _probs(b, S, rows):
    """``rows[r][i] = (token, prob)``: position i puts ``prob`` on ``token`` and spreads the rest
    evenly over the other non-mask tokens."""
    p = torch.zeros(b, S, V)
    for r in range(b):
        for i, (tok, q) in enumerate(rows[r]):
            others = [v for v in range(V) if v not in (tok, MASK)]
            p[r, i, others] = (1 - q) / len(others)
            p[r, i, tok] = q
    return p


def _conf(q: float) -> float:
    """The confidence the decoder computes for a scripted probability (exact float path)."""
    p = _probs(1, 1, [[(5, q)]])
    logits = p.clamp_min(1e-30).log().float()
    logits[..., MASK] = -1e12
    return float(logits.log_softmax(-1)[0, 0, 5].exp())


def test_threshold_is_strictly_greater():
    gamma = _conf(0.7)
    # position 0 sits exactly at gamma (must NOT commit), position 1 above it (must commit)
    probs = _probs(1, 4, [[(5, 0.7), (6, 0.9), (4, 0.3), (4, 0.2)]])
    model = Scripted([probs])
    generate_mask_diffusion(model, torch.tensor([[9, 9]]), max_new_tokens=4, block_size=4, steps_per_block=4,
                            mask_token_id=MASK, confidence_threshold=gamma)
    after_first = model.calls[1][0][0]
    assert after_first.tolist() == [MASK, 6, MASK, MASK]


def test_min_commit_and_last_step_commits_all():
    low = _probs(1, 4, [[(5, 0.2), (6, 0.3), (7, 0.25), (4, 0.15)]])
    model = Scripted([low])
    out = generate_mask_diffusion(model, torch.tensor([[9]]), max_new_tokens=4, block_size=4, steps_per_block=2,
                                  mask_token_id=MASK, confidence_threshold=0.9)
    # step 0: nothing passes gamma -> c = 1, but ceil(4 / 2) = 2: the two most confident commit
    assert model.calls[1][0][0].tolist() == [MASK, 6, 7, MASK]
    # step 1 is the last: everything left commits, so 2 NFE for the block
    assert out.nfe == 2 and out.sequences[0, 1:].tolist() == [5, 6, 7, 4]
    assert commit_counts(torch.tensor([5]), torch.tensor([0]), 0, 4).item() == 2  # ceil(5/4)
    assert commit_counts(torch.tensor([5]), torch.tensor([4]), 0, 4).item() == 4
    assert commit_counts(torch.tensor([3]), torch.tensor([0]), 3, 4).item() == 3


def test_batch_mean_time_remask_lowest_and_eos_stops_after_block():
    # row 0: 2 confident positions, row 1: 1 -> after step 0 the rows differ; t is the batch mean
    probs = _probs(2, 4, [[(5, 0.95), (6, 0.97), (7, 0.3), (2, 0.4)],
                          [(5, 0.2), (6, 0.99), (7, 0.3), (4, 0.25)]])
    model = Scripted([probs])
    out = generate_mask_diffusion(model, torch.tensor([[9], [9]]), max_new_tokens=12, block_size=4,
                                  steps_per_block=4, mask_token_id=MASK, confidence_threshold=0.9, eos_token_id=2)
    xt1, t1 = model.calls[1]
    assert xt1.tolist() == [[5, 6, MASK, MASK], [MASK, 6, MASK, MASK]]  # lowest-confidence re-masked
    assert torch.allclose(t1, torch.full((2,), 5 / 8))  # 5 of the batch's 8 positions masked
    assert torch.allclose(model.calls[0][1], torch.ones(2))
    # row 0's block holds eos (token 2): decoding stops after that block, which is kept whole and
    # consumed by the context tower block-wise
    assert out.sequences.shape == (2, 5) and 2 in out.sequences[0].tolist()
    assert [bw for _, bw in model.extended] == [False, True]
    assert out.nfe == len(model.calls)


def test_max_new_tokens_must_be_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="max_new_tokens=10 must be a multiple of block_size=4"):
        generate_mask_diffusion(Scripted([]), torch.tensor([[9]]), max_new_tokens=10, block_size=4)


def test_sampling_uses_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(300)]
    assert set(draws) == {0, 1}
    draws = [int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7: the token crossing top_p (0.3) is kept
    draws = [int(sample_next(logits, 1.0, generator=g)) for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.5) < 0.05 and draws.count(3) > 40
    assert int(sample_next(logits, 0.0)) == 0


# ------------------------------------------------------------------ a real (tiny) model
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


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_mock_ar_equals_ar_on_a_fresh_model(pair, prompt_len):
    """The release's plumbing check: a denoiser copied from the backbone, no time conditioning,
    fed the newest token from the caches shifted back one token, IS the AR model."""
    _, model = pair
    prompt = torch.randint(4, 96, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ar = generate_ar(model, prompt, max_new_tokens=10)
    mock = generate_mock_ar(model, prompt, max_new_tokens=10)
    assert torch.equal(mock.sequences, ar.sequences)
    # and it is not trivially so: a perturbed denoiser drifts away
    with torch.no_grad():
        for p in model.denoiser_tower.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(generate_mock_ar(model, prompt, max_new_tokens=10).sequences, ar.sequences)


def test_threshold_compares_the_models_probability(pair):
    """The first step commits exactly the masked positions whose SUBS probability (temperature 1)
    is above gamma; gamma is set between the observed confidences."""
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
    assert torch.equal(seen[1] != MASK, conf > gamma)


def test_gamma_zero_commits_the_block_in_one_forward(pair):
    _, model = pair
    prompt = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    out = generate_mask_diffusion(model, prompt, max_new_tokens=8, block_size=4, mask_token_id=MASK,
                                  confidence_threshold=0.0)
    assert out.nfe == 2 and out.tokens_per_nfe == 4
    with torch.no_grad():
        _, cache = model.context_forward(prompt)
        logits = model.denoise_block(torch.full((1, 4), MASK), torch.ones(1), cache)
    assert torch.equal(out.sequences[:, 6:10], logits.argmax(-1))


def test_towers_on_devices(pair):
    _, model = pair
    place_towers_on_devices(model, "cpu", "cpu")
    out = generate_mask_diffusion(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, block_size=4,
                                  mask_token_id=MASK)
    assert out.sequences.shape == (1, 7) and not (out.sequences == MASK).any()
