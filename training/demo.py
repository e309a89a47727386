"""``twotower-demo``: the method proved end to end on a CPU, with the production commands.

    twotower-demo                                   # everything under runs/demo/ (~15 min, 2 cores)
    twotower-demo --out /tmp/demo --ar-steps 100 --steps 60 --heldout 8 --bench-limit 2   # shrunken

Stages, each a production command run as a subprocess (its progress lines print as they come):

1. data: held-out task prompts (``DIR/tasks/<task>.jsonl``) and a training corpus without them
   (``data/demo_tasks.py``: copy, count, countdown, skip-count; answers are long deterministic
   spans), tokenized into verified webdataset shards (``twotower-tokenize``, byte tokenizer);
2. backbone: ``twotower-train experiment=demo_ar`` (``objective=ar``), then its checkpoint as a
   Hugging Face ``NemotronHForCausalLM`` folder (``twotower-convert export-hf --backbone-only
   --verify``: reloaded with transformers and compared);
3. denoiser: ``twotower-train experiment=demo backbone=...`` stopped halfway
   (``trainer.exit_after_steps``, exit code 6, as after a preemption) and the same command again,
   which resumes from the checkpoint;
4. export: ``twotower-convert export-hf --verify`` (reloaded with plain transformers, compared);
5. generate: ``twotower-generate --mode all`` (diffusion at gamma 0.8, mock-AR, AR) on held-out prompts;
6. evaluate: ``twotower-eval`` on the held-out tasks, AR vs diffusion at gamma 0.8 (the paper's table);
7. benchmark: ``twotower-bench-decode`` over gamma and batch size;
8. report: ``runs/demo/report.md`` with both tables, the targets (met or missed, with numbers)
   and PNG plots (both loss curves; throughput and quality vs gamma) (``training/demo_report.py``).

The targets (issue 11): at gamma 0.8, >= 2 tokens per denoiser forward, >= 1.5x AR tokens/s
(same checkpoint, batch 1) and >= 90% of AR's exact-match accuracy on the held-out tasks AR gets
>= 80% right. The report states what was measured; nothing is tuned to the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

STAGES = ("data", "backbone", "denoiser", "export", "generate", "evaluate", "benchmark", "report")
EXIT_STOPPED_EARLY = 6  # twotower-train: stopped with a checkpoint (trainer.exit_after_steps)


class DemoError(RuntimeError):
    """A stage failed: the message names the stage and the command."""


def command(name: str) -> str:
    """The console script ``name`` of this environment (beside this Python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DemoError(f"command {name!r} not found beside {sys.executable} or on PATH (pip install -e .)")
    return found


class Stages:
    """Runs the stages' commands, prints progress, records each stage's wall time."""

    def __init__(self, out: Path):
        self.out, self.times, self.t0 = out, {}, time.perf_counter()
        self.load_at_start = os.getloadavg()  # 1 / 5 / 15 min: other jobs on the cores slow every stage
        self._current: tuple[str, float] | None = None

    def begin(self, name: str, what: str) -> None:
        self.end()
        k = STAGES.index(name) + 1
        print(f"\n[demo {k}/{len(STAGES)}] {name}: {what} (t+{time.perf_counter() - self.t0:.0f}s)", flush=True)
        self._current = (name, time.perf_counter())

    def end(self) -> None:
        if self._current is not None:
            name, start = self._current
            self.times[name] = round(time.perf_counter() - start, 1)
            print(f"[demo] {name} done in {self.times[name]:.0f}s", flush=True)
            self._current = None

    def run(self, name: str, *args: str, ok: tuple[int, ...] = (0,)) -> int:
        """Run ``name args...``; its output streams to ours and is appended to ``logs/<stage>.log``.
        A return code outside ``ok`` fails the demo."""
        cmd = [command(name), *map(str, args)]
        stage = self._current[0] if self._current else "demo"
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print("$ " + " ".join(cmd), flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "a", encoding="utf-8") as fh, subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            fh.write("$ " + " ".join(cmd) + "\n")
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                fh.write(line)
            rc = proc.wait()
        if rc not in ok:
            raise DemoError(f"{name} exited with code {rc} (log: {log}): {' '.join(cmd)}")
        return rc


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="twotower-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="where data, runs, exports and the report go")
    ap.add_argument("--docs", type=int, default=40_000, help="training documents (one task instance each)")
    ap.add_argument("--heldout", type=int, default=48, help="held-out prompts per task (evaluation)")
    ap.add_argument("--ar-steps", type=int, default=None, help="AR steps (default: experiment=demo_ar's)")
    ap.add_argument("--steps", type=int, default=None, help="denoiser steps (default: experiment=demo's)")
    ap.add_argument("--gamma", type=float, default=0.8, help="the confidence threshold of the paper's table")
    ap.add_argument("--bench-gammas", default="0.5,0.7,0.8,0.9,1.0")
    ap.add_argument("--bench-limit", type=int, default=5, help="prompts per task in the benchmark")
    ap.add_argument("--bench-repeats", type=int, default=2, help="interleaved repeats (medians: less noise)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per prompt")
    ap.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    ap.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra twotower-train override for both trainings (repeatable)")
    args = ap.parse_args(argv)
    for name in ("docs", "heldout", "bench_limit", "bench_repeats", "max_new_tokens", "workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("ar_steps", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            ap.error(f"--{name.replace('_', '-')} must be >= 2 (the denoiser is stopped halfway and resumed)")
    if not args.gamma > 0:
        ap.error("--gamma must be > 0")
    return args


def _experiment_value(experiment: str, group: str, key: str) -> int:
    """``<group>.<key>`` of ``conf/experiment/<experiment>.yaml`` (step counts, sequence and block size)."""
    path = Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"{experiment}.yaml"
    return int(yaml.safe_load(path.read_text())[group][key])


def verify_shards(data_dir: Path) -> dict[str, int]:
    """Check every shard of a tokenized dataset against its manifest (bytes, sha256, sample count,
    every sample decodable at ``seq_len`` within the vocab); returns the samples per split."""
    from twotower.data.shards import decode_sample, iter_shard, read_manifest, sha256_file

    manifest = read_manifest(data_dir)
    counts = {}
    for split, info in manifest["splits"].items():
        n = 0
        for shard in info["shards"]:
            path = data_dir / shard["name"]
            if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                raise DemoError(f"{path}: size or sha256 differs from {data_dir / 'manifest.json'}")
            k = sum(1 for s in iter_shard(path) if decode_sample(s, manifest["seq_len"], manifest["vocab_size"], False))
            if k != shard["samples"]:
                raise DemoError(f"{path}: {k} samples, the manifest lists {shard['samples']}")
            n += k
        counts[split] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    out = Path(args.out).resolve()
    for stale in ("ar", "twotower", "backbone_hf", "twotower_hf", "data", "eval", "bench", "report.md", "plots"):
        if (out / stale).exists():  # a previous demo's runs would be resumed, its tables reused
            print(f"[demo] removing the previous demo's {out / stale}", flush=True)
            shutil.rmtree(out / stale) if (out / stale).is_dir() else (out / stale).unlink()
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out)
    try:
        summary = _pipeline(args, out, st)
    except DemoError as e:
        print(f"[demo] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"\n[demo] done in {time.perf_counter() - st.t0:.0f}s: {out / 'report.md'}", flush=True)
    print(json.dumps(summary["targets"], indent=2), flush=True)
    return 0


def _pipeline(args: argparse.Namespace, out: Path, st: Stages) -> dict:
    from twotower.data.demo_tasks import TASKS, write_demo_inputs

    ar_steps = args.ar_steps or _experiment_value("demo_ar", "trainer", "max_steps")
    steps = args.steps or _experiment_value("demo", "trainer", "max_steps")
    seq_len = _experiment_value("demo", "trainer", "seq_len")
    block = _experiment_value("demo", "twotower", "block_size")
    if args.max_new_tokens % block:
        raise DemoError(f"--max-new-tokens={args.max_new_tokens} must be a multiple of the block size {block}")

    st.begin("data", f"{len(TASKS)} tasks, {args.docs} training documents, {args.heldout} held-out prompts per task")
    raw, tasks = write_demo_inputs(out / "data", args.docs, args.heldout)
    shards = out / "data" / "shards"
    st.run("twotower-tokenize", "--input", *raw, "--output", shards, "--tokenizer", "byte", "--seq-len", seq_len,
           "--val-ratio", "0.02", "--workers", args.workers, "--shard-samples", "256")
    counts = verify_shards(shards)
    print(f"[demo] shards verified (size, sha256, every sample decoded): {counts}", flush=True)

    common = [f"data.train.0.path={shards}", f"data.valid_path={shards}", "logging=none", *args.train_override]
    st.begin("backbone", f"AR pretraining of a small Nemotron-H ({ar_steps} steps), export as NemotronHForCausalLM")
    st.run("twotower-train", "experiment=demo_ar", f"trainer.run_dir={out / 'ar'}", f"trainer.max_steps={ar_steps}",
           f"checkpoint.interval={ar_steps}", *common)
    backbone = out / "backbone_hf"  # the frozen context tower of stage 3, as a NemotronHForCausalLM
    st.run("twotower-convert", "export-hf", "--checkpoint", out / "ar" / "checkpoints", "--output", backbone,
           "--backbone-only", "--dtype", "fp32", "--verify")

    half = steps // 2
    st.begin("denoiser", f"train the denoiser {steps} steps on the frozen backbone; stop at step {half} "
                         "(as if preempted), then run the same command again to resume")
    denoiser = ["experiment=demo", f"backbone={backbone}", f"trainer.run_dir={out / 'twotower'}",
                f"trainer.max_steps={steps}", f"checkpoint.interval={half}", *common]
    rc = st.run("twotower-train", *denoiser, f"trainer.exit_after_steps={half}", ok=(0, EXIT_STOPPED_EARLY))
    if rc != EXIT_STOPPED_EARLY:
        raise DemoError(f"the first denoiser run should stop at step {half} with exit code 6, got {rc}")
    print(f"[demo] stopped at step {half} (exit code 6); resuming with the same command", flush=True)
    st.run("twotower-train", *denoiser)

    export = out / "twotower_hf"
    st.begin("export", "the TwoTower as a released-layout Hugging Face folder, reloaded with transformers")
    st.run("twotower-convert", "export-hf", "--checkpoint", out / "twotower" / "checkpoints", "--output", export,
           "--verify")

    st.begin("generate", f"held-out prompts in the three modes (diffusion at gamma {args.gamma}, mock-AR, AR)")
    prompts = out / "prompts.txt"
    prompts.write_text("".join(json.loads(p.read_text().splitlines()[0])["prompt"] + "\n"
                               for p in sorted(tasks.glob("*.jsonl"))))
    st.run("twotower-generate", "--run", out / "twotower", "--prompt-file", prompts, "--mode", "all",
           "--gamma", args.gamma, "--max-new-tokens", args.max_new_tokens)

    model = ["--hf", export, "--tokenizer", "byte"]  # the exported folder, as a user would get it
    st.begin("evaluate", f"held-out tasks, AR vs diffusion at gamma {args.gamma} (exact match)")
    st.run("twotower-eval", *model, "--tasks", f"local:{tasks}", "--decoder", "diffusion", "--gamma", args.gamma,
           "--batch-size", 1, "--max-gen-toks", args.max_new_tokens, "--out", out / "eval")

    st.begin("benchmark", f"AR and diffusion at gamma {args.bench_gammas}, batch 1 and 8")
    st.run("twotower-bench-decode", *model, "--tasks", f"local:{tasks}", "--gammas", args.bench_gammas,
           "--block-sizes", block, "--batch-sizes", "1,8", "--repeats", args.bench_repeats,
           "--limit", args.bench_limit, "--max-new-tokens", args.max_new_tokens, "--out", out / "bench")

    st.begin("report", f"{out / 'report.md'} with the tables, the targets and the plots")
    from twotower.training.demo_report import write_report

    settings = {"load_at_start": " / ".join(f"{x:.1f}" for x in st.load_at_start), "ar_steps": ar_steps, "steps": steps, "seq_len": seq_len, "block_size": block, "docs": args.docs,
                "heldout": args.heldout}
    write_report(out, args.gamma, st.times, settings)  # the plots take most of this stage's time
    st.end()
    return write_report(out, args.gamma, st.times, settings)  # again, with the report stage's own time


if __name__ == "__main__":
    sys.exit(main())
