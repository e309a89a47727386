"""``twotower-bench-decode``: its counters are the decoders' own, gamma > 1 decodes one token per
denoiser forward, and a run writes the tables and the plot with finite numbers.

Oracle: ``generate_mask_diffusion`` / ``generate_ar`` called directly on each prompt.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import PROMPTS, TRAINING_BLOCK, tiny_twotower_folder, write_tasks

from twotower.model.decoding import generate_ar, generate_mask_diffusion
from twotower.training.bench_decode import main, run_variant
from twotower.training.eval_model import text_until


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_twotower_folder(tmp_path_factory.mktemp("bench") / "hf")


@pytest.fixture(scope="module")
def em(folder):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.eval_model import open_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield open_model(hf=str(folder), tokenizer="byte")
    destroy_parallel()
    torch.set_num_threads(threads)


def _variant(decoder, gamma=None, block=None, batch=1):
    return {"decoder": decoder, "gamma": gamma, "block_size": block, "batch_size": batch}


@pytest.mark.parametrize("gamma", [0.3, 0.9])
def test_tokens_per_forward_are_the_decoders_counts(em, gamma):
    prompts = [em.tokenizer.encode(p) for p in PROMPTS]
    answers = ["", "", ""]
    got = run_variant(em, _variant("diffusion", gamma, TRAINING_BLOCK), prompts, answers, 8, None)
    tokens = nfe = 0
    for i, p in enumerate(prompts):
        out = generate_mask_diffusion(em.model, torch.tensor([p]), 8, block_size=TRAINING_BLOCK,
                                      steps_per_block=TRAINING_BLOCK, mask_token_id=3, confidence_threshold=gamma,
                                      eos_token_id=em.tokenizer.eos_id)
        tokens, nfe = tokens + out.new_tokens, nfe + out.nfe
        answers[i] = text_until(em, out.sequences[0, len(p):].tolist(), ["\n"]).strip()
    assert (got["tokens"], got["nfe"]) == (tokens, nfe)
    # the answers are the decoder's own outputs: every prompt matches
    assert run_variant(em, _variant("diffusion", gamma, TRAINING_BLOCK), prompts, answers, 8, None)["exact_match"] == 1
    ar = run_variant(em, _variant("ar"), prompts, answers, 8, None)
    direct = [generate_ar(em.model, torch.tensor([p]), 8, eos_token_id=em.tokenizer.eos_id) for p in prompts]
    assert ar["tokens"] == sum(o.new_tokens for o in direct) and ar["nfe"] == sum(o.nfe for o in direct)


@pytest.mark.parametrize("batch", [1, 2])
def test_gamma_above_one_commits_one_token_per_forward(em, batch):
    prompts = [em.tokenizer.encode(p) for p in ["abc=", "xyz=", "Hello"]]
    got = run_variant(em, _variant("diffusion", 1.5, TRAINING_BLOCK, batch), prompts, ["", "", ""], 8, None)
    assert got["tokens"] == got["nfe"] > 0
    seen = []
    generate_mask_diffusion(em.model, torch.tensor([prompts[0]]), 8, block_size=TRAINING_BLOCK,
                            steps_per_block=TRAINING_BLOCK, mask_token_id=3, confidence_threshold=1.5,
                            step_callback=lambda blk, k, xt: seen.append(int((xt != 3).sum())))
    assert seen == [1, 2, 3, 4, 1, 2, 3, 4]  # one more committed position per denoiser forward


def test_bench_writes_tables_and_plot_with_finite_numbers(em, folder, tmp_path, monkeypatch):
    # the command destroys the process group when done; the module's model still needs it
    monkeypatch.setattr("twotower.model.parallel_init.destroy_parallel", lambda: None)
    write_tasks(tmp_path / "tasks", {"t1": [(p, "x") for p in PROMPTS[:2]], "t2": [(PROMPTS[2], "y")]})
    out = tmp_path / "bench"
    rc = main(["--hf", str(folder), "--tokenizer", "byte", "--tasks", f"local:{tmp_path / 'tasks'}",
               "--gammas", "0.5,1.5", "--block-sizes", "2,4", "--batch-sizes", "1,2", "--repeats", "2",
               "--max-new-tokens", "4", "--threads", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    variants = data["variants"]
    assert len(variants) == 2 * (1 + 2 * 2)
    for v in variants:
        for key in ("tokens_per_forward", "tokens_per_s", "ratio_vs_ar", "exact_match"):
            assert math.isfinite(v[key]), (v, key)
        assert len(v["repeats"]) == 2
        first = v["repeats"][0]
        assert v["tokens_per_forward"] == first["tokens"] / first["nfe"]
        if v["decoder"] == "ar":
            assert v["ratio_vs_ar"] == 1.0
        elif v["gamma"] > 1:
            assert v["tokens_per_forward"] == 1.0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert md.count("| diffusion |") == 8 and md.count("| ar |") == 2
