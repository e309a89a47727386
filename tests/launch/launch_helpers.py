"""Shared values of the launcher tests (test helper; conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

#: A tiny run: 30 steps of the smoke model (a few seconds of training on 2 cores).
STEPS = 30
TINY = ["experiment=smoke_cpu", f"trainer.max_steps={STEPS}", "trainer.log_interval=1", "trainer.eval_interval=0",
        "checkpoint.interval=10"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step in ``run_dir/metrics.jsonl``."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]
