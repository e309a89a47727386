"""``twotower-launch status``: where a launched run stands, from its run directory alone.

Input: a run directory (``run_dir=DIR``, a bare ``DIR``, or the launch's own overrides
``experiment=NAME ...`` to find ``trainer.run_dir``). Output, as a table or one JSON object
(``--json``):

* the newest complete checkpoint and its step;
* steps and tokens done of the budget (``trainer.max_steps``; tokens against
  ``trainer.tokens_budget`` or ``max_steps x global batch x seq_len``);
* the last logged metrics (loss, tokens/s, MFU when logged);
* an ETA at the recent rate: remaining tokens / the median tokens/s of the last 10 log lines
  (compute time only: queue waits between segments are not in it);
* the submissions' job ids with their states when ``squeue``/``sacct`` answer, the last segments'
  decisions, the failure counter and a DONE / GAVE_UP mark.

Examples::

    twotower-launch status run_dir=runs/twotower_nano_2p1t
    twotower-launch status experiment=twotower_nano_2p1t --json
"""

from __future__ import annotations

import datetime as _dt
import statistics
from pathlib import Path
from typing import Any

import yaml

from twotower.launch import slurm
from twotower.launch.rundir import RunDir

RECENT = 10


def collect(run_dir: str | Path) -> dict[str, Any]:
    rd = RunDir(Path(run_dir).resolve())
    cfg = _config(rd)
    t = cfg.get("trainer", {})
    ckpt_dir = (cfg.get("checkpoint") or {}).get("dir") or str(rd.path / "checkpoints")
    step, path = rd.latest_checkpoint(ckpt_dir)
    rows = _metrics(rd.path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    tokens_per_step = int(t.get("global_batch_size", 0)) * int(t.get("seq_len", 0))
    budget = float(t.get("tokens_budget") or 0) or float(t.get("max_steps", 0)) * tokens_per_step
    tokens = float(last.get("tokens", 0))
    rates = [float(r["tokens_per_s"]) for r in train_rows[-RECENT:] if r.get("tokens_per_s")]
    rate = statistics.median(rates) if rates else None
    eta = (budget - tokens) / rate if rate and budget > tokens else (0.0 if budget and tokens >= budget else None)
    subs = rd.submissions()
    job_ids = [j for s in subs for j in s.get("job_ids", []) if not str(j).startswith("local")]
    latest_sub = subs[-1]["submission"] if subs else None
    marks = {m: (rd.launch / latest_sub / m).read_text().strip()
             for m in ("DONE", "GAVE_UP") if latest_sub and (rd.launch / latest_sub / m).exists()}
    return {
        "run_dir": str(rd.path),
        "experiment": subs[-1].get("experiment") if subs else None,
        "checkpoint": {"step": step if step >= 0 else None, "path": str(path) if path else None},
        "step": last.get("step"), "max_steps": t.get("max_steps"),
        "tokens": tokens, "tokens_budget": budget,
        "last": {k: last.get(k) for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time") if k in last},
        "validation": {k: v for r in rows for k, v in r.items() if k.startswith("val/")},
        "recent_tokens_per_s": rate, "eta_s": eta,
        "jobs": [{"job_id": j, "state": s} for j, s in _states(job_ids).items()],
        "segments": rd.segments()[-5:], "failures": rd.failures(), "submission": latest_sub, "marks": marks,
    }


def format_status(s: dict[str, Any]) -> str:
    def num(x, fmt="{:,.0f}"):
        return "?" if x is None else fmt.format(x)

    ck, last = s["checkpoint"], s["last"]
    pct = f" ({100 * s['tokens'] / s['tokens_budget']:.1f}%)" if s["tokens_budget"] else ""
    metrics = []
    if last.get("loss") is not None:
        metrics.append(f"loss {last['loss']:.4f}")
    if last.get("tokens_per_s"):
        metrics.append(f"{last['tokens_per_s']:,.0f} tok/s")
    if last.get("mfu"):
        metrics.append(f"MFU {last['mfu']:.1%}")
    if last.get("time"):
        metrics.append(f"at {_when(last['time'])}")
    checkpoint = "none yet" if ck["step"] is None else f"step {ck['step']}: {ck['path']}"
    lines = [
        f"run dir        {s['run_dir']}  (experiment={s['experiment']})",
        f"checkpoint     {checkpoint}",
        (f"progress       step {num(s['step'])} / {num(s['max_steps'])}, tokens {num(s['tokens'], '{:.4g}')} / "
        f"{num(s['tokens_budget'], '{:.4g}')}{pct}"),
        f"last metrics   {' | '.join(metrics) or 'none yet'}",
        (f"ETA            {_duration(s['eta_s'])} at {num(s['recent_tokens_per_s'])} tok/s "
        f"(median of the last {RECENT} log lines; queue time not included)"),
    ]
    if s["validation"]:
        lines.append("validation     " + ", ".join(f"{k} {v:.4f}" for k, v in s["validation"].items()))
    if s["jobs"]:
        lines.append("jobs           " + ", ".join(f"{j['job_id']} {j['state']}" for j in s["jobs"]))
    for seg in s["segments"]:
        lines.append(f"segment        job {seg.get('job_id')} restart {seg.get('restart')}: exit {seg.get('rc')}, "
                     f"checkpoint step {seg.get('step_before')} -> {seg.get('step_after')}: {seg.get('decision')}")
    lines.append(f"failures       {s['failures']} segment(s) in a row without a new checkpoint")
    for mark, text in s["marks"].items():
        lines.append(f"{mark:<15}{text}")
    return "\n".join(lines)


def _config(rd: RunDir) -> dict:
    """The trainer's resolved config, else the newest submission's (nothing trained yet)."""
    candidates = [rd.path / "config.yaml"]
    subs = rd.submissions()
    if subs:
        candidates.append(rd.launch / subs[-1]["submission"] / "config.yaml")
    for p in candidates:
        if p.exists():
            try:
                return yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError:
                continue
    return {}


def _metrics(path: Path) -> list[dict]:
    return RunDir._jsonl(path)


def _states(job_ids: list[str]) -> dict[str, str]:
    known = slurm.states(job_ids)
    return {j: known.get(j, "unknown (no squeue/sacct answer)") for j in job_ids}


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else str(_dt.timedelta(seconds=int(seconds)))


def _when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

