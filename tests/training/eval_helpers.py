"""A tiny exported TwoTower for the evaluation tests (``twotower-eval``, ``twotower-bench-decode``).

Two random ``NemotronHForCausalLM`` (context seed 0, denoiser seed 1) with the byte tokenizer's
vocabulary (260, mask id 3), written in the released layout with our remote code
(``tests/model/test_hf_remote.py``'s ``write_released_folder``) and a training block of 4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from hf_tiny import tiny_hf_model
from test_hf_remote import write_released_folder

VOCAB = 260
TRAINING_BLOCK = 4


def tiny_context_hf():
    """The context tower as a transformers model (an oracle independent of our towers)."""
    return tiny_hf_model("all_types", seed=0, vocab_size=VOCAB)


def tiny_twotower_folder(path: Path) -> Path:
    folder = write_released_folder(path, tiny_context_hf(), tiny_hf_model("all_types", seed=1, vocab_size=VOCAB))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["twotower_block_size"] = TRAINING_BLOCK
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def write_tasks(folder: Path, tasks: dict[str, list[tuple[str, str]]]) -> Path:
    """``folder/<name>.jsonl`` with ``{"prompt", "answer"}`` lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in tasks.items():
        lines = [json.dumps({"prompt": p, "answer": a}) for p, a in pairs]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


PROMPTS = ["abc=", "xyz=", "Hello, w"]
