"""Metrics: a console line per log interval, ``metrics.jsonl`` and Weights & Biases.

Stage: after each logged step and each validation, on global rank 0 only. Input: a dict of
scalars. Output: a human line (step, loss, lr, grad norm, tokens/s, TFLOP/s per device,
MFU, ETA), one JSON object per line in ``{run_dir}/metrics.jsonl`` (always at least
``step, loss, lr, grad_norm, tokens, tokens_per_s``), and wandb (offline by default; no
account needed, sync later with ``wandb sync``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from twotower.training.config import LoggingConfig


def supersede_rows_after(path: str | Path, step: int) -> int:
    """Move the rows of ``metrics.jsonl`` logged after ``step`` (and torn lines) to
    ``metrics.superseded.jsonl`` beside it; returns how many. Called when a run (re)starts at
    ``step``: rows of a launch whose later steps were not checkpointed (a crash between saves, a
    damaged newest checkpoint, ``checkpoint.resume=none``) would otherwise contradict the rows the
    new launch writes for the same steps."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        (keep if row_step is not None and row_step <= step and line.endswith("\n") else drop).append(line)
    if drop:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.writelines(x if x.endswith("\n") else x + "\n" for x in drop)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return len(drop)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, *, enabled: bool, config: dict | None = None,
                 max_steps: int, start_step: int = 0):
        self.enabled, self.max_steps = enabled, max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._t0 = time.perf_counter()
        self._first_step = start_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                import wandb

                self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                         name=cfg.run_name or Path(run_dir).name, dir=str(run_dir),
                                         mode=cfg.wandb_mode, config=config, resume="allow")
            except Exception as err:  # noqa: BLE001 (logging must never kill a training run)
                print(f"[twotower] wandb disabled: {err}", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if console:
            print(self.format(step, metrics), flush=True)

    def eta(self, step: int) -> str:
        done = step - self._first_step
        if done <= 0:
            return "?"
        per_step = (time.perf_counter() - self._t0) / done
        return str(_dt.timedelta(seconds=int(per_step * max(self.max_steps - step, 0))))

    def format(self, step: int, m: dict[str, Any]) -> str:
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val/nelbo", "val nelbo {:.4f}"),
                         ("val/bits_per_token", "{:.3f} bits/tok"), ("val/ar_nll", "val AR nll {:.4f}"),
                         ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("tflops_per_device", "{:.2f} TFLOP/s/dev"), ("mfu", "MFU {:.1%}"),
                         ("skipped_steps", "skipped {:d}")):
            v = m.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if key == "tflops_per_device" and v < 1:  # CPU runs: TFLOP/s would print 0.00
                parts.append(f"{v * 1e3:.2f} GFLOP/s/dev")
                continue
            parts.append(fmt.format(int(v) if key == "skipped_steps" else v))
        if "loss" in m:
            parts.append(f"ETA {self.eta(step)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._wandb is not None:
                self._wandb.finish()
