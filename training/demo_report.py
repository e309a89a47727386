"""The demo's report: targets met or missed, the paper-style table, the benchmark, the plots.

Stage: the last stage of ``twotower-demo``. Input: the demo folder (``ar/metrics.jsonl``,
``twotower/metrics.jsonl``, ``eval/eval.json`` of ``twotower-eval``, ``bench/bench.json`` of
``twotower-bench-decode``), the stages' wall times. Output: ``report.md``, ``summary.json`` and
``plots/loss.png`` (both trainings' loss curves, the resume marked), ``plots/gamma.png``
(throughput x AR and exact match against gamma, batch 1 and 8).

Targets (issue 11), all at the evaluation's gamma and batch size 1, from ``eval.json``:

* tokens per denoiser forward >= 2 (the decoder's own counts: generated tokens / forwards);
* diffusion tokens/s >= 1.5 x AR tokens/s (the same checkpoint; ``throughput_x_ar``);
* on the tasks AR gets >= 80% right, diffusion's exact match >= 90% of AR's (pooled over those
  tasks: mean diffusion score / mean AR score). No such task means the target is missed.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

TARGETS = {"tokens_per_forward": 2.0, "throughput_x_ar": 1.5, "quality_retained": 0.9}
AR_GOOD = 0.8  # the tasks the quality target is judged on: AR's exact match >= this


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (the trainer's log; rows a resume superseded are not in it)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_curve(rows: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if key in r and r[key] is not None]


def targets(eval_json: dict, gamma: float) -> dict:
    """Each target's measured value, threshold and verdict (see the module docstring)."""
    agg, rows = eval_json["aggregate"], eval_json["tasks"]
    good = [r for r in rows if r["ar"] >= AR_GOOD]
    quality = (sum(r["diffusion"] for r in good) / sum(r["ar"] for r in good)) if good else None
    measured = {"tokens_per_forward": agg["tokens_per_forward"], "throughput_x_ar": agg["throughput_x_ar"],
                "quality_retained": quality}
    out = {"gamma": gamma, "tasks_ar_ge_80pct": [r["task"] for r in good]}
    for name, threshold in TARGETS.items():
        value = measured[name]
        met = value is not None and math.isfinite(value) and value >= threshold
        out[name] = {"value": value, "target": threshold, "met": met}
    out["all_met"] = all(out[name]["met"] for name in TARGETS)
    return out


def plot_losses(ar_rows: list[dict], tt_rows: list[dict], resume_step: int | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, title, val_key, val_name in (
            (a, ar_rows, "backbone: AR pretraining", "val/ar_nll", "val AR NLL"),
            (b, tt_rows, "denoiser (frozen context tower)", "val/nelbo", "val NELBO")):
        if loss_curve(rows):
            ax.plot(*zip(*loss_curve(rows), strict=True), label="train loss")
        if loss_curve(rows, val_key):
            ax.plot(*zip(*loss_curve(rows, val_key), strict=True), "o-", label=val_name)
        ax.set(title=title, xlabel="step", ylabel="nats / token")
        ax.grid(alpha=0.3)
    if resume_step is not None:
        b.axvline(resume_step, color="grey", ls="--", label=f"stopped + resumed at {resume_step}")
    for ax in (a, b):
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gamma(bench_json: dict, path: Path) -> Path:
    """Throughput x AR and exact match against gamma, per batch size (the benchmark's variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    variants = bench_json["variants"]
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for bs in sorted({v["batch_size"] for v in variants}):
        for S in sorted({v["block_size"] for v in variants if v["decoder"] == "diffusion"}):
            c = next(colors)
            pts = sorted((v["gamma"], v["ratio_vs_ar"], v["exact_match"], v["tokens_per_forward"]) for v in variants
                         if v["decoder"] == "diffusion" and v["batch_size"] == bs and v["block_size"] == S)
            g = [p[0] for p in pts]
            a.plot(g, [p[1] for p in pts], "o-", color=c, label=f"tokens/s x AR, batch {bs}, S={S}")
            a.plot(g, [p[3] for p in pts], "s:", color=c, label=f"tokens/forward, batch {bs}, S={S}")
            b.plot(g, [p[2] for p in pts], "o-", color=c, label=f"diffusion, batch {bs}, S={S}")
        ar = [v for v in variants if v["decoder"] == "ar" and v["batch_size"] == bs]
        if ar:
            b.axhline(ar[0]["exact_match"], ls="--", color=c, label=f"AR, batch {bs}")
    a.axhline(1.0, color="black", lw=0.8)
    a.set(title="speed vs confidence threshold", xlabel="gamma", ylabel="x AR  /  tokens per forward")
    b.set(title="quality vs confidence threshold", xlabel="gamma", ylabel="exact match", ylim=(-0.02, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()} {platform.release()}; "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; above "
            f"{len(os.sched_getaffinity(0))} means other jobs shared the cores)")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def _targets_md(t: dict) -> str:
    names = {"tokens_per_forward": "tokens per denoiser forward", "throughput_x_ar": "tokens/s x AR (batch 1)",
             "quality_retained": f"exact match vs AR on tasks AR gets >= {AR_GOOD:.0%} right "
                                 f"({', '.join(t['tasks_ar_ge_80pct']) or 'none'})"}
    lines = [f"| target (gamma {t['gamma']:g}) | measured | required | |", "|---|---|---|---|"]
    for key, label in names.items():
        pct = key == "quality_retained"
        lines.append(f"| {label} | {_fmt(t[key]['value'], pct)} | >= {_fmt(t[key]['target'], pct)} | "
                     f"{'met' if t[key]['met'] else '**MISSED**'} |")
    verdict = "All targets met." if t["all_met"] else "**Not all targets met** (numbers above, not tuned away)."
    return "\n".join(lines) + f"\n\n{verdict}\n"


def _bench_reading(bench_json: dict, gamma: float) -> str:
    """The benchmark's batch-1 numbers at ``gamma``: a second, independent timing of the same model."""
    v = {(x["decoder"], x["gamma"], x["batch_size"]): x for x in bench_json["variants"]}
    df, ar = v.get(("diffusion", gamma, 1)), v.get(("ar", None, 1))
    if df is None or ar is None:
        return ""
    return (f"Second reading (the benchmark below, its own prompts and timing, batch 1, block {df['block_size']}): "
            f"{df['tokens_per_forward']:.2f} tokens/forward, {df['ratio_vs_ar']:.2f}x AR tokens/s, exact match "
            f"{df['exact_match']:.1%} vs AR {ar['exact_match']:.1%} (all tasks, generating to eos).\n")


def _generations(out: Path) -> str:
    log = out / "logs" / "generate.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(line for line in lines if line.startswith("[")) or "(no generate log)"


def write_report(out: Path, gamma: float, times: dict, settings: dict) -> dict:
    """``out/report.md``, ``out/summary.json`` and the plots; returns the summary."""
    ar_rows, tt_rows = read_metrics(out / "ar"), read_metrics(out / "twotower")
    eval_json = json.loads((out / "eval" / "eval.json").read_text())
    bench_json = json.loads((out / "bench" / "bench.json").read_text())
    resume = settings.get("steps", 0) // 2 or None
    loss_png = plot_losses(ar_rows, tt_rows, resume, out / "plots" / "loss.png")
    gamma_png = plot_gamma(bench_json, out / "plots" / "gamma.png")
    t = targets(eval_json, gamma)
    last = {k: (loss_curve(rows, k) or [(None, None)])[-1][1]
            for rows, k in ((ar_rows, "val/ar_nll"), (tt_rows, "val/nelbo"))}
    summary = {"targets": t, "stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
               "settings": settings, "backbone_val_ar_nll": last["val/ar_nll"],
               "denoiser_val_nelbo": last["val/nelbo"], "machine": machine(),
               "plots": [str(loss_png.relative_to(out)), str(gamma_png.relative_to(out))]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stage_md = " · ".join(f"{k} {v:.0f} s" for k, v in times.items())
    report = f"""# twotower demo report

Machine: {summary['machine']}.
Wall time {summary['total_seconds']:.0f} s: {stage_md}.
Backbone: {settings['ar_steps']} AR steps (val AR NLL {_fmt(last['val/ar_nll'])} nats/token); denoiser:
{settings['steps']} steps, stopped at step {resume} and resumed (val NELBO {_fmt(last['val/nelbo'])} nats/token);
sequence length {settings['seq_len']}, block size {settings['block_size']}, the released recipe
(conf/experiment/demo.yaml); {settings['docs']} training documents, {settings['heldout']} held-out prompts per task
(data/demo_tasks.py). Load average when the demo started: {settings.get('load_at_start', 'n/a')}.

## Targets

{_targets_md(t)}
{_bench_reading(bench_json, gamma)}
## AR vs diffusion on the held-out tasks (twotower-eval)

{(out / 'eval' / 'eval.md').read_text()}
## Decode benchmark (twotower-bench-decode)

{(out / 'bench' / 'bench.md').read_text()}
## Held-out prompts in the three modes (twotower-generate --mode all)

```
{_generations(out)}
```

## Plots

![loss curves]({loss_png.relative_to(out)})

![throughput and quality vs gamma]({gamma_png.relative_to(out)})
"""
    (out / "report.md").write_text(report)
    return summary
