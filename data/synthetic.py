"""A small, deterministic, learnable synthetic corpus (stage: demo/test input).

Output: ``.jsonl`` files of ``{"text": ...}`` documents whose structure a tiny model can learn in
minutes on CPU: templated sentences with agreement (a subject fixes its verb form), additions with
correct sums, counting runs and key=value recalls (a value stated early is repeated later). The
same ``seed`` always gives the same bytes.

:func:`prepare_demo_data` generates the corpus and tokenizes it with the byte tokenizer into the
directory ``conf/data/demo.yaml`` points to (``runs/demo/data``, relative to the working directory),
unless a dataset is already there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NOUNS = ["cat", "dog", "bird", "robot", "farmer", "river", "teacher", "engine", "child", "ship"]
ADJS = ["small", "red", "quiet", "old", "bright", "heavy", "quick", "green"]
VERBS = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("builds", "build"), ("finds", "find")]
PLACES = ["in the garden", "near the sea", "at the station", "under the bridge", "on the hill"]


def _sentence(r: random.Random) -> str:
    plural = r.random() < 0.4
    subj = r.choice(NOUNS) + ("s" if plural else "")
    verb = r.choice(VERBS)[1 if plural else 0]
    return f"the {r.choice(ADJS)} {subj} {verb} the {r.choice(NOUNS)} {r.choice(PLACES)}."


def _arith(r: random.Random) -> str:
    a, b = r.randrange(100), r.randrange(100)
    return f"{a} + {b} = {a + b}."


def _count(r: random.Random) -> str:
    start = r.randrange(50)
    return "count: " + " ".join(str(start + i) for i in range(r.randrange(4, 10))) + "."


def generate_documents(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents, each 3-12 lines; deterministic in ``seed``."""
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        key, value = r.choice(NOUNS), r.randrange(1000)
        lines = [f"note: {key} = {value}."]
        for _ in range(r.randrange(3, 12)):
            lines.append(r.choice((_sentence, _sentence, _arith, _count))(r))
        lines.append(f"recall: {key} = {value}.")
        docs.append("\n".join(lines))
    return docs


def write_demo_corpus(out_dir: str | Path, n_docs: int = 2000, n_files: int = 4, seed: int = 0) -> list[Path]:
    """Write ``n_files`` jsonl files (~150 bytes per line of text; 2000 docs ~ 800 KB) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(n_docs, seed)
    paths = []
    for f in range(n_files):
        path = out / f"demo-{f:02d}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": doc}) + "\n" for doc in docs[f::n_files])
        paths.append(path)
    return paths


def prepare_demo_data(
    data_dir: str | Path = "runs/demo/data",
    seq_len: int = 256,
    n_docs: int = 2000,
    workers: int = 1,
    seed: int = 0,
) -> Path:
    """Generate + tokenize (byte tokenizer) the demo corpus into ``data_dir`` unless already there."""
    from twotower.data.shards import MANIFEST
    from twotower.data.tokenize import tokenize_corpus

    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).exists():
        return data_dir
    raw = write_demo_corpus(data_dir / "raw", n_docs=n_docs, seed=seed)
    # small shards so that dp_size x num_workers slots each get their own shard
    tokenize_corpus(
        [str(p) for p in raw],
        data_dir,
        "byte",
        seq_len,
        val_ratio=0.05,
        workers=workers,
        samples_per_shard=128,
    )
    return data_dir
