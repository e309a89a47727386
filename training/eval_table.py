"""The paper-style evaluation table: per task AR vs diffusion, quality retained, throughput.

Stage: evaluation output (``twotower-eval``). Input: per task and decoder, lm-eval's score of the
task's primary metric and the decoder counters of ``TwoTowerLM.stats``. Output: rows (dicts) and
``eval.md`` / ``eval.json``. Definitions:

* quality retained = diffusion score / AR score (None when AR scores 0);
* tokens per forward = generated tokens / forwards of the generating tower, per sequence (the
  decoders' own counts; diffusion counts whole blocks, as the release returns them);
* tokens/s = the tokens each answer needed (through the token that completed the stop string or
  eos) / decoding seconds, so diffusion is not credited for the rest of its last block; throughput x AR = the
  diffusion tokens/s over the AR tokens/s of the same run;
* the aggregate row averages the scores over tasks (quality retained = mean diffusion / mean AR,
  as the paper's 98.7%) and divides total kept tokens by total decode seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SKIP_KEYS = ("alias", "samples", "sample_len", " ", "name")


def primary_metric(task_result: dict) -> tuple[str, float]:
    """The first ``metric,filter`` entry of an lm-eval per-task result (``"exact_match,none"``,
    ``"acc,none"``...) that is a number and not a stderr."""
    for key, value in task_result.items():
        if key in SKIP_KEYS or "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        return key, float(value)
    raise KeyError(f"no numeric metric in {sorted(task_result)}")


def throughput(stats: dict) -> dict:
    """``tokens_per_forward``, ``tokens_per_s`` (kept tokens / second) of ``TwoTowerLM.stats``;
    None when the task generated nothing (likelihood tasks)."""
    if not stats.get("nfe"):
        return {"tokens_per_forward": None, "tokens_per_s": None}
    return {"tokens_per_forward": stats["tokens"] / stats["nfe"],
            "tokens_per_s": stats["kept_tokens"] / max(stats["seconds"], 1e-9)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def make_row(task: str, metric: str, ar_score: float, diff_score: float, ar_stats: dict, diff_stats: dict) -> dict:
    ar_tp, df_tp = throughput(ar_stats), throughput(diff_stats)
    return {"task": task, "metric": metric, "ar": ar_score, "diffusion": diff_score,
            "quality_retained": _ratio(diff_score, ar_score),
            "tokens_per_forward": df_tp["tokens_per_forward"], "ar_tokens_per_forward": ar_tp["tokens_per_forward"],
            "ar_tokens_per_s": ar_tp["tokens_per_s"], "diffusion_tokens_per_s": df_tp["tokens_per_s"],
            "throughput_x_ar": _ratio(df_tp["tokens_per_s"], ar_tp["tokens_per_s"]),
            "ar_stats": ar_stats, "diffusion_stats": diff_stats}


def aggregate(rows: list[dict]) -> dict:
    def total(key: str, field: str) -> float:
        return sum(r[key][field] for r in rows)

    ar = sum(r["ar"] for r in rows) / len(rows)
    df = sum(r["diffusion"] for r in rows) / len(rows)
    ar_stats = {f: total("ar_stats", f) for f in ("tokens", "nfe", "seconds", "kept_tokens")}
    df_stats = {f: total("diffusion_stats", f) for f in ("tokens", "nfe", "seconds", "kept_tokens")}
    return make_row("mean", "", ar, df, ar_stats, df_stats)


def _fmt(x, digits: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def markdown(rows: list[dict], settings: dict) -> str:
    head = (f"Model `{settings['model']}`; diffusion: gamma {settings['gamma']}, block size "
            f"{settings['block_size']}, steps per block {settings['steps_per_block']}, batch size "
            f"{settings['batch_size']}; AR: the context tower, greedy.\n\n")
    cols = ["task", "metric", "AR", "diffusion", "quality retained", "tokens/forward", "AR tok/s",
            "diffusion tok/s", "throughput x AR"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in [*rows, aggregate(rows)] if rows else []:
        task = f"**{r['task']}**" if r["task"] == "mean" else r["task"]
        lines.append("| " + " | ".join([
            task, r["metric"].split(",")[0], _fmt(r["ar"]), _fmt(r["diffusion"]), _fmt(r["quality_retained"], pct=True),
            _fmt(r["tokens_per_forward"], 2), _fmt(r["ar_tokens_per_s"], 1), _fmt(r["diffusion_tokens_per_s"], 1),
            _fmt(r["throughput_x_ar"], 2)]) + " |")
    return head + "\n".join(lines) + "\n"


def write_tables(out: str | Path, rows: list[dict], settings: dict) -> tuple[Path, Path]:
    """``out/eval.md`` and ``out/eval.json`` (settings, per-task rows, the aggregate row)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    md.write_text(markdown(rows, settings))
    js.write_text(json.dumps({"settings": settings, "tasks": rows, "aggregate": aggregate(rows) if rows else None},
                             indent=2))
    return md, js
