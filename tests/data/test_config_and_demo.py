"""conf/data YAMLs compose into a valid DataConfig; the demo's task corpus is deterministic, its
answers are right, its held-out prompts stay out of training, and it loads through the loader;
the tests' synthetic corpus is deterministic."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from twotower.data import demo_tasks
from twotower.data.config import DataConfig, register
from twotower.data.loader import build_train_loader, build_valid_loader
from twotower.data.synthetic import generate_documents

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(name: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+data={name}"]).data


@pytest.mark.parametrize("name", ["demo", "blend_2p1t"])
def test_yaml_composes_to_valid_config(name, monkeypatch):
    monkeypatch.setenv("TWOTOWER_DATA", "/data/tok")
    cfg = DataConfig.from_any(_compose(name))
    assert cfg.train and all(d.weight > 0 for d in cfg.train)
    if name == "blend_2p1t":
        assert [d.path for d in cfg.train] == ["/data/tok/web", "/data/tok/code"]
        assert [d.weight for d in cfg.train] == [0.7, 0.3] and cfg.vocab_size == 131072


def test_register_schema():
    register()
    from hydra.core.config_store import ConfigStore

    assert "schema.yaml" in ConfigStore.instance().repo["data"]


def test_synthetic_corpus_is_deterministic():
    assert generate_documents(5, seed=3) == generate_documents(5, seed=3) != generate_documents(5, seed=4)


def _check_answer(task: str, prompt: str, answer: str) -> None:
    """An independent statement of each task's rule."""
    words = prompt.split()
    if task == "copy":
        assert answer == words[1] and 4 <= len(answer) <= 8
        return
    nums = [int(x) for x in answer.split()]
    step = {"count": 1, "countdown": -1}.get(task) or int(words[1])
    assert nums[0] == int(words[-2]) and len(nums) == demo_tasks.TERMS == 8
    assert [b - a for a, b in itertools.pairwise(nums)] == [step] * (len(nums) - 1)
    assert prompt.endswith(" > ")


def test_demo_tasks_are_right_deterministic_and_held_out(tmp_path):
    assert demo_tasks.generate_documents(50) == demo_tasks.generate_documents(50)
    docs = demo_tasks.generate_documents(400)
    assert len(docs) == 400 and all(d.endswith("\n") and d.count("\n") == 1 for d in docs)
    for task in demo_tasks.TASKS:
        pairs = demo_tasks.examples(task, 20, seed=1)
        assert len({p for p, _ in pairs}) == 20
        for prompt, answer in pairs:
            _check_answer(task, prompt, answer)
    raw, tasks = demo_tasks.write_demo_inputs(tmp_path, n_docs=2000, n_heldout=10)
    corpus = "".join(p.read_text() for p in raw)
    files = sorted(tasks.glob("*.jsonl"))
    assert [f.stem for f in files] == sorted(demo_tasks.TASKS)
    for f in files:
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(recs) == 10 and all(set(r) == {"prompt", "answer"} for r in recs)
        assert not any(json.dumps(r["prompt"])[1:-1] in corpus for r in recs)
    with pytest.raises(ValueError, match="unknown demo task"):
        demo_tasks.examples("sorting", 1, 0)


def test_demo_corpus_loads_at_the_configured_path(tmp_path, monkeypatch):
    from twotower.data.tokenize import tokenize_corpus

    monkeypatch.chdir(tmp_path)
    raw, _ = demo_tasks.write_demo_inputs("runs/demo/data", n_docs=1500, n_heldout=4)
    cfg = DataConfig.from_any(_compose("demo"))  # the relative path conf/data/demo.yaml points to
    tokenize_corpus([str(p) for p in raw], cfg.train[0].path, "byte", cfg.seq_len, val_ratio=0.05, workers=1,
                    samples_per_shard=64)
    batch = next(build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=4))
    assert batch["tokens"].shape == (4, 128) and int(batch["tokens"].max()) < 260
    assert sum(b["tokens"].shape[0] for b in build_valid_loader(cfg, 0, 1, 8)) > 0
