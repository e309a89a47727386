"""The demo's corpus: tasks whose checkable answers are long deterministic spans (stage: demo input).

Each document is one task instance, ``"<prompt><answer>\\n"``, and the answer is a function of the
prompt, so a model that has learned the task can write the whole answer (and a block-diffusion
denoiser can commit many of its tokens per forward). Tasks:

=========  ===================================  =========================================
task       prompt                               answer
=========  ===================================  =========================================
copy       ``copy: hbkagep > ``                 ``hbkagep``
count      ``count from 397 > ``                ``397 398 399 400 401 402 403 404``
countdown  ``down from 402 > ``                 ``402 401 400 399 398 397 396 395``
skip       ``by 4 from 97 > ``                  ``97 101 105 109 113 117 121 125``
=========  ===================================  =========================================

Why these: the demo's backbone trains for ~4 minutes on 2 CPU cores. Counting-like tasks (a local
successor rule, the step read from the prompt, always 8 numbers) are learned in that budget;
when the length was given as an end value (``count 397 to 402``) the backbone counted right but
stopped at a length it guessed (17% exact match). Copying needs an induction mechanism that a
model this small forms late: copy shows a task the backbone has not learned. (Reversal, sorting
and key-value recall were tried at this budget too: the backbone solved none of them.)

:func:`write_corpus` writes the training documents as ``.jsonl`` (``{"text": ...}``, the input of
``twotower-tokenize``); :func:`write_task_files` writes held-out prompts, per task
``tasks/<task>.jsonl`` with lines ``{"prompt", "answer"}`` (what ``twotower-eval --tasks local:DIR``
reads). Held-out prompts come from another seed and are removed from the training corpus, so an
exact-match score measures the task, not recall of a training line. Same seed, same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

LETTERS = "abcdefghijklmnop"
TRAIN_SEED, HELDOUT_SEED = 0, 10_000
TERMS = 8  # numbers in a counting answer: a fixed length, so stopping needs no look-up


def _word(r: random.Random, lo: int, hi: int) -> str:
    return "".join(r.choice(LETTERS) for _ in range(r.randint(lo, hi)))


def _copy(r: random.Random) -> tuple[str, str]:
    s = _word(r, 4, 8)
    return f"copy: {s} > ", s


def _numbers(values: range) -> str:
    return " ".join(str(i) for i in values)


def _count(r: random.Random) -> tuple[str, str]:
    start = r.randrange(10, 990)
    return f"count from {start} > ", _numbers(range(start, start + TERMS))


def _countdown(r: random.Random) -> tuple[str, str]:
    start = r.randrange(20, 1000)
    return f"down from {start} > ", _numbers(range(start, start - TERMS, -1))


def _skip(r: random.Random) -> tuple[str, str]:
    step, start = r.randint(2, 9), r.randrange(10, 930)
    return f"by {step} from {start} > ", _numbers(range(start, start + step * TERMS, step))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy, "count": _count, "countdown": _countdown, "skip": _skip,
}


def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``task``, distinct prompts, deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; known: {', '.join(TASKS)}")
    r = random.Random(f"{task}:{seed}")
    seen: dict[str, str] = {}
    for _ in range(50 * n):  # far more tries than needed: the input spaces are large
        if len(seen) == n:
            break
        prompt, answer = TASKS[task](r)
        seen.setdefault(prompt, answer)
    return list(seen.items())


def heldout_prompts(tasks: list[str], n_per_task: int, seed: int = HELDOUT_SEED) -> dict[str, list[tuple[str, str]]]:
    return {t: examples(t, n_per_task, seed) for t in tasks}


def generate_documents(n_docs: int, seed: int = TRAIN_SEED, tasks: list[str] | None = None,
                       exclude: set[str] = frozenset()) -> list[str]:
    """``n_docs`` documents ``"<prompt><answer>\\n"``, tasks equally often in random order, none whose prompt is in ``exclude``."""
    tasks = list(tasks or TASKS)
    r = random.Random(f"corpus:{seed}")
    docs: list[str] = []
    while len(docs) < n_docs:
        prompt, answer = TASKS[tasks[len(docs) % len(tasks)]](r)
        if prompt not in exclude:
            docs.append(f"{prompt}{answer}\n")
    r.shuffle(docs)  # no task order to learn: what follows an answer is a random next task
    return docs


def write_task_files(out_dir: str | Path, n_per_task: int, tasks: list[str] | None = None,
                     seed: int = HELDOUT_SEED) -> dict[str, Path]:
    """``out_dir/<task>.jsonl`` of held-out ``{"prompt", "answer"}`` lines, one file per task."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, pairs in heldout_prompts(list(tasks or TASKS), n_per_task, seed).items():
        paths[task] = out / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return paths


def write_corpus(out_dir: str | Path, n_docs: int, n_files: int = 4, tasks: list[str] | None = None,
                 exclude: set[str] = frozenset(), seed: int = TRAIN_SEED) -> list[Path]:
    """The training documents as ``n_files`` jsonl files (``{"text": doc}`` per line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(n_docs, seed, tasks, exclude)
    paths = []
    for f in range(n_files):
        paths.append(out / f"demo-{f:02d}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::n_files]))
    return paths


def write_demo_inputs(out_dir: str | Path, n_docs: int, n_heldout: int,
                      tasks: list[str] | None = None) -> tuple[list[Path], Path]:
    """Held-out task files under ``out_dir/tasks`` and the corpus (without them) under ``out_dir/raw``."""
    out = Path(out_dir)
    task_paths = write_task_files(out / "tasks", n_heldout, tasks)
    exclude = {json.loads(line)["prompt"] for p in task_paths.values() for line in p.read_text().splitlines()}
    return write_corpus(out / "raw", n_docs, tasks=tasks, exclude=exclude), out / "tasks"


def main(argv: list[str] | None = None) -> int:
    """``python -m twotower.data.demo_tasks OUT [N_DOCS] [N_HELDOUT]``: write the demo's inputs."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out = args[0] if args else "runs/demo/data"
    raw, tasks = write_demo_inputs(out, int(args[1]) if len(args) > 1 else 40_000,
                                   int(args[2]) if len(args) > 2 else 64)
    print(f"corpus: {', '.join(map(str, raw))}\nheld-out tasks: {tasks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
