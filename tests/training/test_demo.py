"""The README's main job, shrunken to a few minutes: ``twotower-demo`` end to end with the
production commands, and every stage's output checked (issue 11)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from twotower.data.demo_tasks import TASKS

SHRUNKEN = ["--docs", "3000", "--heldout", "3", "--ar-steps", "60", "--steps", "24", "--bench-gammas", "0.8,1.5",
            "--bench-limit", "1", "--max-new-tokens", "32", "--workers", "1",
            "--train-override", "trainer.log_interval=4", "--train-override", "trainer.eval_interval=0",
            "--train-override", "optim.warmup_steps=4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    demo_cli = Path(sys.executable).with_name("twotower-demo")
    proc = subprocess.run([str(demo_cli), "--out", str(out), *SHRUNKEN], capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_every_stage_reports_progress(demo):
    _, stdout = demo
    for k, stage in enumerate(("data", "backbone", "denoiser", "export", "generate", "evaluate", "benchmark",
                               "report"), start=1):
        assert f"[demo {k}/8] {stage}:" in stdout
    assert "step 60/60" in stdout and "step 24/24" in stdout  # the trainers' progress lines came through


@pytest.mark.slow
def test_shards_verify_and_heldout_prompts_are_not_trained_on(demo):
    from twotower.training.demo import verify_shards

    out, _ = demo
    counts = verify_shards(out / "data" / "shards")
    assert counts["train"] > 0 and counts["valid"] > 0
    corpus = "".join(p.read_text() for p in (out / "data" / "raw").glob("*.jsonl"))
    tasks = sorted((out / "data" / "tasks").glob("*.jsonl"))
    assert [p.stem for p in tasks] == sorted(TASKS)
    for path in tasks:
        for line in path.read_text().splitlines():
            assert json.dumps(json.loads(line)["prompt"])[1:-1] not in corpus


@pytest.mark.slow
def test_both_losses_fall_and_the_resume_continues_the_curve(demo):
    out, stdout = demo
    ar, tt = _losses(out / "ar"), _losses(out / "twotower")
    assert ar[-1][1] < ar[0][1] - 0.5, ar
    assert tt[-1][1] < tt[0][1], tt
    # the denoiser run stopped at step 12 (exit code 6) and the same command resumed it there
    assert "stopped at step 12 (exit code 6)" in stdout
    log = (out / "logs" / "denoiser.log").read_text()
    assert "fresh start" in log and "resumed at step 12" in log
    steps = [s for s, _ in tt]
    assert steps == sorted(set(steps)) and steps[-1] == 24 and 12 in steps and 16 in steps
    ckpts = sorted(p.name for p in (out / "twotower" / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_00000024" and "step_00000012" in ckpts
    before, after = dict(tt)[12], dict(tt)[16]
    assert after < tt[0][1] and abs(after - before) < 0.5 * tt[0][1]  # continued, not restarted


@pytest.mark.slow
def test_the_export_reloads_with_transformers(demo):
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = demo
    model = AutoModelForCausalLM.from_pretrained(out / "twotower_hf", trust_remote_code=True)
    ids = torch.tensor([list(b"copy: abc > ")]) + 4
    logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    assert (out / "backbone_hf" / "config.json").exists()


@pytest.mark.slow
def test_all_three_modes_generate(demo):
    out, _ = demo
    lines = (out / "logs" / "generate.log").read_text().splitlines()
    for mode in ("diffusion", "mock_ar", "ar"):
        rows = [line for line in lines if line.startswith(f"[{mode:9s}]")]
        assert len(rows) == len(TASKS) and all("tok/s" in r and " -> " in r for r in rows), lines


@pytest.mark.slow
def test_evaluation_table_benchmark_and_plots_have_finite_numbers(demo):
    out, _ = demo
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert sorted(r["task"] for r in ev["tasks"]) == sorted(TASKS)
    agg = ev["aggregate"]
    for key in ("ar", "diffusion", "tokens_per_forward", "ar_tokens_per_s", "diffusion_tokens_per_s", "throughput_x_ar"):
        assert math.isfinite(agg[key]), (key, agg)
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert {(v["decoder"], v["gamma"], v["batch_size"]) for v in bench["variants"]} >= {
        ("ar", None, 1), ("diffusion", 0.8, 1), ("diffusion", 1.5, 8)}
    assert all(math.isfinite(v["tokens_per_s"]) and math.isfinite(v["tokens_per_forward"]) for v in bench["variants"])
    # gamma > 1: nothing is ever confident enough, exactly one token per denoiser forward
    assert all(v["tokens_per_forward"] == 1.0 for v in bench["variants"] if v["gamma"] == 1.5)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("tokens_per_forward", "throughput_x_ar"):
        assert math.isfinite(summary["targets"][name]["value"])
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "| copy |" in report and "tokens/forward" in report
    for png in ("plots/loss.png", "plots/gamma.png", "bench/bench.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report or png.startswith("bench/")
