"""The lm-eval model type ``twotower`` (``training/lm_eval_model.py``) and ``twotower-eval``.

Oracles: the context tower's log-probabilities computed directly (and transformers' own
NemotronH on the same weights), the release's decoders called directly (``model/decoding.py``),
and lm-eval's own evaluator over a local JSONL task whose answers are known.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import PROMPTS, TRAINING_BLOCK, tiny_context_hf, tiny_twotower_folder, write_tasks
from lm_eval.api.instance import Instance

from twotower.model.decoding import generate_ar, generate_mask_diffusion
from twotower.training.eval_model import text_until
from twotower.training.lm_eval_model import TwoTowerLM


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_twotower_folder(tmp_path_factory.mktemp("eval") / "hf")


@pytest.fixture(scope="module")
def em(folder):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.eval_model import open_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a shared machine
    yield open_model(hf=str(folder), tokenizer="byte")
    destroy_parallel()
    torch.set_num_threads(threads)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _direct_logprob(em, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    logits, _ = em.model.context_forward(ids, return_logits=True)
    logp = logits[0, :-1].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_loglikelihood_is_the_context_towers_sum_of_log_probs(em):
    lm = TwoTowerLM(model=em, decoder="diffusion", batch_size=2)  # batches pad on the right
    pairs = [("Hello", " world"), ("ab", "cdefg"), ("", "xyz"), ("The cat sat", " on")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    hf = tiny_context_hf()
    for (c, x), (ll, _) in zip(pairs, got, strict=True):
        ctx = em.tokenizer.encode(c) or [em.tokenizer.eos_id]  # lm-eval's prefix token for empty contexts
        cont = em.tokenizer.encode(x)
        assert abs(ll - _direct_logprob(em, ctx, cont)) <= 1e-5
        with torch.no_grad():  # transformers' NemotronH on the same weights: an independent forward
            ref = hf(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0, :-1].float().log_softmax(-1)
        assert abs(ll - sum(ref[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))) <= 1e-4


def test_is_greedy_and_rolling(em):
    lm = TwoTowerLM(model=em, decoder="ar")
    prompt = em.tokenizer.encode("abc=")
    greedy = generate_ar(em.model, torch.tensor([prompt]), 3).sequences[0, len(prompt):].tolist()
    other = [(greedy[0] - 4 + 1) % 256 + 4] + greedy[1:]
    got = lm._loglikelihood_tokens([(None, prompt, greedy), (None, prompt, other)])
    assert got[0][1] is True and got[1][1] is False
    text = "rolling text"
    (rolling,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    assert abs(rolling - _direct_logprob(em, [em.tokenizer.eos_id], em.tokenizer.encode(text))) <= 1e-5


def _first_stop(text: str) -> int:
    """An index k >= 1 whose character occurs first there: ``text[k]`` as a stop string cuts at k."""
    for k in range(1, len(text)):
        if text[k] not in text[:k] and text[k] != "\ufffd":
            return k
    pytest.skip("the random model's text has no usable stop character")


@pytest.mark.parametrize("decoder", ["ar", "diffusion"])
def test_generate_until_stops_at_until_and_respects_max_gen_toks(em, decoder):
    prompt = em.tokenizer.encode(PROMPTS[0])
    kw = dict(block_size=TRAINING_BLOCK, steps_per_block=TRAINING_BLOCK, mask_token_id=3, confidence_threshold=0.5,
              eos_token_id=em.tokenizer.eos_id)
    if decoder == "ar":
        full = generate_ar(em.model, torch.tensor([prompt]), 12, eos_token_id=em.tokenizer.eos_id)
    else:
        full = generate_mask_diffusion(em.model, torch.tensor([prompt]), 12, **kw)
    ids = full.sequences[0, len(prompt):].tolist()
    text = text_until(em, ids, [])
    k = _first_stop(text)
    lm = TwoTowerLM(model=em, decoder=decoder, gamma=0.5)
    (cut,) = lm.generate_until([_req("generate_until", PROMPTS[0], {"until": [text[k]], "max_gen_toks": 12})])
    assert cut == text[:k]
    # the stop hook ended decoding at the token (AR) / after the block (diffusion) that completed the stop string
    step = 1 if decoder == "ar" else TRAINING_BLOCK
    assert lm.stats["tokens"] == step * math.ceil(lm.stats["kept_tokens"] / step)
    assert lm.stats["kept_tokens"] == next(j for j in range(1, 13) if text[k] in em.tokenizer.decode(ids[:j]))
    (short,) = lm.generate_until([_req("generate_until", PROMPTS[0], {"until": [], "max_gen_toks": 5})])
    assert short == em.tokenizer.decode(ids[:5])  # diffusion decodes 2 blocks of 4, returns 5 tokens


def test_batches_of_equal_length_prompts_decode_like_single_prompts(em):
    reqs = [_req("generate_until", p, {"until": ["\n"], "max_gen_toks": 6}) for p in PROMPTS]
    single = TwoTowerLM(model=em, decoder="ar", batch_size=1).generate_until(reqs)
    batched = TwoTowerLM(model=em, decoder="ar", batch_size=3)
    assert batched.generate_until(reqs) == single
    assert batched.stats["requests"] == 3


def test_block_larger_than_training_block_warns(em):
    with pytest.warns(UserWarning, match="larger than the block the denoiser was trained with"):
        TwoTowerLM(model=em, decoder="diffusion", block_size=2 * TRAINING_BLOCK)


def test_registered_by_name_only_when_imported(em, folder):
    code = ("import lm_eval.api.registry as r\n"
            "import twotower.training.evaluate, twotower.training.eval_model, twotower.training.bench_decode\n"
            "assert 'twotower' not in r.model_registry.keys(), 'registered without importing lm_eval_model'\n"
            "import twotower.training.lm_eval_model as m\n"
            "assert r.get_model('twotower') is m.TwoTowerLM\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # lm-eval's own construction path: a model_args string (every value arrives as text or a number)
    from lm_eval.api.registry import get_model

    lm = get_model("twotower").create_from_arg_string(f"hf={folder},tokenizer=byte,decoder=diffusion,gamma=2.5,"
                                                      "block_size=4,steps_per_block=2", {"batch_size": "3"})
    assert (lm.gamma, lm.block_size, lm.steps_per_block, lm.batch_size, lm.decoder) == (2.5, 4, 2, 3, "diffusion")


def test_local_task_through_lm_evals_evaluator(em, tmp_path):
    import lm_eval

    from twotower.training.local_tasks import select_tasks, task_manager, write_task_yamls

    # answers: the model's own AR output for two prompts (cut at the newline), a wrong one for the third
    answers = []
    for p in PROMPTS:
        ids = em.tokenizer.encode(p)
        out = generate_ar(em.model, torch.tensor([ids]), 8, eos_token_id=em.tokenizer.eos_id)
        answers.append(text_until(em, out.sequences[0, len(ids):].tolist(), ["\n"]).strip())
    answers[2] = answers[2] + "WRONG"
    write_tasks(tmp_path / "tasks", {"mytask": list(zip(PROMPTS, answers, strict=True))})
    sel = select_tasks([f"local:{tmp_path / 'tasks'}"])
    tm = task_manager(sel, write_task_yamls(sel.local, tmp_path / "yaml", max_gen_toks=8))
    lm = TwoTowerLM(model=em, decoder="ar")
    res = lm_eval.simple_evaluate(model=lm, tasks=["mytask"], task_manager=tm, bootstrap_iters=0)
    assert res["results"]["mytask"]["exact_match,none"] == pytest.approx(2 / 3)
    assert lm.stats["requests"] == 3


def test_twotower_eval_writes_the_table(em, folder, tmp_path, monkeypatch):
    # the command destroys the process group when done; the module's model still needs it
    monkeypatch.setattr("twotower.model.parallel_init.destroy_parallel", lambda: None)
    from twotower.training.evaluate import main

    write_tasks(tmp_path / "tasks", {"t1": [(p, "x") for p in PROMPTS[:2]], "t2": [(PROMPTS[2], "y")]})
    out = tmp_path / "eval"
    rc = main(["--hf", str(folder), "--tokenizer", "byte", "--tasks", f"local:{tmp_path / 'tasks'}", "--gamma", "0.5",
               "--max-gen-toks", "8", "--batch-size", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    table = json.loads((out / "eval.json").read_text())
    assert [r["task"] for r in table["tasks"]] == ["t1", "t2"]
    for row in [*table["tasks"], table["aggregate"]]:
        for key in ("ar", "diffusion", "tokens_per_forward", "ar_tokens_per_s", "diffusion_tokens_per_s",
                    "throughput_x_ar"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["task"], key)
        stats = row["diffusion_stats"]
        assert row["tokens_per_forward"] == stats["tokens"] / stats["nfe"]
    md = (out / "eval.md").read_text()
    assert "quality retained" in md and "| t1 |" in md and "**mean**" in md
    assert (out / "tasks" / "t1.yaml").exists()


def test_likelihood_task_through_lm_evals_evaluator(em, tmp_path):
    """A multiple-choice task (the MMLU kind) over a local file: lm-eval picks the choice with the
    highest log-likelihood; the accuracy equals the one from the context tower's log-probs."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    docs = [{"q": "abc=", "choices": [" x", " yz", " 1"], "gold": 0},
            {"q": "Hello,", "choices": [" world", " there"], "gold": 1},
            {"q": "1+1=", "choices": ["2", "3", "11"], "gold": 2}]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    config = {"task": "mc_local", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mc.jsonl")}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "q", "doc_to_choice": "{{choices}}",
              "doc_to_target": "gold", "target_delimiter": "", "metric_list": [{"metric": "acc"}],
              "metadata": {"version": 1.0}}
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "mc_local.yaml").write_text(yaml.safe_dump(config))
    tm = TaskManager(include_path=str(tmp_path / "yaml"), include_defaults=False)
    res = lm_eval.simple_evaluate(model=TwoTowerLM(model=em, decoder="diffusion", batch_size=4), tasks=["mc_local"],
                                  task_manager=tm, bootstrap_iters=0)
    correct = 0
    for d in docs:
        ctx = em.tokenizer.encode(d["q"])
        scores = [_direct_logprob(em, ctx, em.tokenizer.encode(c)) for c in d["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == d["gold"]
    assert res["results"]["mc_local"]["acc,none"] == pytest.approx(correct / len(docs))


@pytest.mark.parametrize("decoder", ["ar", "diffusion"])
def test_a_row_that_ends_early_does_not_cut_the_others(em, decoder, monkeypatch):
    """The release's decoders end a whole batch once any row emits eos; an evaluation batch must
    decode every row to its own end. Oracle: the same batch with an eos no row ever emits."""
    from twotower.training.eval_model import decode

    n, prompts = 12, [em.tokenizer.encode(p) for p in PROMPTS[:2]]
    monkeypatch.setattr(em.tokenizer, "eos_id", -1)
    ref, _ = decode(em, decoder, prompts, n, gamma=0.5)
    # the first token row 0 generates (after the first) that row 1 never does becomes "eos"
    k = next(j for j in range(1, n) if ref[0][j] not in ref[1])
    monkeypatch.setattr(em.tokenizer, "eos_id", ref[0][k])
    rows, out = decode(em, decoder, prompts, n, gamma=0.5)
    assert rows[1] == ref[1]  # not cut where row 0 ended
    assert rows[0][:k + 1] == ref[0][:k + 1]
    assert out.new_tokens == n
