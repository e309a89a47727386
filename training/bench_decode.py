"""``twotower-bench-decode``: AR vs diffusion decoding of one TwoTower over gamma x block size x batch.

    twotower-bench-decode --hf runs/demo/twotower_hf --tokenizer byte --tasks local:runs/demo/tasks --out runs/demo/bench
    twotower-bench-decode --run runs/demo/twotower --tasks local:tasks --gammas 0.8,0.9 --block-sizes 16 \\
        --batch-sizes 1 --repeats 5 --limit 16 --max-new-tokens 64 --out bench/x

Variants: per batch size, AR (the context tower) and diffusion at every gamma (``--gammas``,
default 0.5,0.7,0.8,0.9,1.0; any value in (0, inf), > 1 = one token per forward) and block size
(``--block-sizes``, default 4,8,16; ``--steps-per-block`` default = the block size). Each repeat
runs every variant over the same prompts, in an order shuffled per repeat (interleaved, so that
a noisy machine slows all variants alike); the report gives medians over repeats and each
variant's tokens/s ratio to AR *of the same repeat and batch size* (median over repeats).

Prompts: ``--tasks local:DIR`` (``DIR/<task>.jsonl``, lines ``{"prompt": str, "answer": str}``;
``--limit`` per task), grouped into batches of equal token length (the decoders take no padding
mask). Every variant generates ``--max-new-tokens`` (a multiple of every block size) or stops at
eos as the release's decoders do. Counters are the decoders' own (``GenerationOutput``): tokens
per forward = generated tokens / forwards of the generating tower, per sequence; tokens/s =
generated tokens / seconds. Quality: exact match of the generation up to its first newline,
stripped, against the answer.

Writes ``OUT/bench.md``, ``OUT/bench.json`` and ``OUT/bench.png`` (throughput ratio and exact match
against gamma, one line per block size). Exit codes: 2 bad arguments, 5 bad input files or a
model folder that is not a TwoTower (both before the model is loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

from twotower.training.eval_model import EvalUsageError, check_decoder_args, run_command
from twotower.training.evaluate import add_source_args, check_counts

UNTIL = ["\n"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twotower-bench-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap)
    ap.add_argument("--gammas", type=_floats, default=[0.5, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--block-sizes", type=_ints, default=[4, 8, 16])
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    ap.add_argument("--steps-per-block", type=int, default=None, help="default: the block size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=16, help="prompts per task")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="a multiple of every block size")
    ap.add_argument("--seed", type=int, default=0, help="of the per-repeat variant order")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is often faster on a shared, busy machine)")
    ap.add_argument("--out", required=True, help="folder for bench.md, bench.json, bench.png")
    return ap


def _check(ap: argparse.ArgumentParser, args) -> None:
    check_counts(ap, args, ("steps_per_block", "repeats", "limit", "max_new_tokens", "threads"))
    for name in ("gammas", "block_sizes", "batch_sizes"):
        if not getattr(args, name):
            ap.error(f"--{name.replace('_', '-')} is empty")
    if any(b < 1 for b in args.batch_sizes):
        ap.error(f"--batch-sizes={args.batch_sizes}: must be positive integers")
    try:
        for g in args.gammas:
            for S in args.block_sizes:
                check_decoder_args("diffusion", g, S, args.steps_per_block)
    except EvalUsageError as e:
        ap.error(str(e))
    bad = [S for S in args.block_sizes if args.max_new_tokens % S]
    if bad:
        lcm = math.lcm(*args.block_sizes)
        ap.error(f"--max-new-tokens={args.max_new_tokens} is not a multiple of block size(s) {bad} "
                 f"(use a multiple of {lcm})")
    items = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not items or any(not t.startswith("local:") for t in items):
        ap.error(f"--tasks={args.tasks!r}: the benchmark reads its prompts from local task folders (local:DIR)")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    return run_command("twotower-bench-decode", args, _run)


def _run(args) -> int:
    from twotower.training.eval_model import check_source, open_model, warmup, warn_block_size
    from twotower.training.local_tasks import select_tasks

    sel = select_tasks(args.tasks.split(","))
    records = [rec for t in sel.local for rec in t.records[:args.limit]]
    check_source(args.run, args.checkpoint, args.hf)
    print(f"[bench] loading {args.run or args.checkpoint or args.hf}", flush=True)
    em = open_model(args.run, args.checkpoint, args.hf, args.backbone, args.tokenizer)
    for S in args.block_sizes:
        warn_block_size(S, em.training_block)
    prompts = [em.tokenizer.encode(r["prompt"]) for r in records]
    longest = max(len(em.tokenizer.encode(r["answer"])) for r in records) + 1  # + the newline that ends it
    if longest > args.max_new_tokens:
        warnings.warn(f"answers need up to {longest} tokens (with the newline) but --max-new-tokens="
                      f"{args.max_new_tokens}: exact match undercounts the longer ones", stacklevel=1)
    warmup(em, ["ar", "diffusion"], min(args.block_sizes))
    variants = run_bench(em, prompts, [r["answer"] for r in records], args)
    settings = {"model": em.source, "training_block_size": em.training_block, "prompts": len(prompts),
                "tasks": sel.names, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                "steps_per_block": args.steps_per_block or "block size", "gammas": args.gammas,
                "block_sizes": args.block_sizes, "batch_sizes": args.batch_sizes}
    md, js, png = write_outputs(args.out, variants, settings)
    print(md.read_text(), flush=True)
    print(f"[bench] wrote {md}, {js} and {png}", flush=True)
    return 0


def variant_list(args) -> list[dict]:
    out = []
    for b in args.batch_sizes:
        out.append({"decoder": "ar", "gamma": None, "block_size": None, "batch_size": b})
        out += [{"decoder": "diffusion", "gamma": g, "block_size": S, "batch_size": b}
                for S in args.block_sizes for g in args.gammas]
    return out


def run_variant(em, v: dict, prompts: list[list[int]], answers: list[str], max_new: int,
                steps_per_block: int | None) -> dict:
    """Every prompt once with variant ``v``: the decoders' counters summed over sequences, and
    the exact-match accuracy."""
    from twotower.training.eval_model import decode, length_batches, text_until

    tokens = nfe = correct = 0
    seconds, batches = 0.0, 0
    for idx in length_batches(prompts, v["batch_size"]):
        rows, out = decode(em, v["decoder"], [prompts[i] for i in idx], max_new, gamma=v["gamma"] or 0.8,
                           block_size=v["block_size"], steps_per_block=steps_per_block)
        tokens += out.new_tokens * len(idx)
        nfe += out.nfe * len(idx)
        seconds += out.seconds
        batches += 1
        correct += sum(text_until(em, row, UNTIL).strip() == answers[i].strip() for i, row in zip(idx, rows, strict=True))
    return {"tokens": tokens, "nfe": nfe, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "exact_match": correct / len(prompts), "mean_batch": len(prompts) / batches}


def run_bench(em, prompts: list[list[int]], answers: list[str], args) -> list[dict]:
    """All variants, ``args.repeats`` times, interleaved in a per-repeat shuffled order; returns
    one summary per variant (medians over repeats, ratios to AR of the same repeat)."""
    variants = variant_list(args)
    runs = [[None] * args.repeats for _ in variants]
    rng = random.Random(args.seed)
    total, t0, done = len(variants) * args.repeats, time.perf_counter(), 0
    for r in range(args.repeats):
        order = list(range(len(variants)))
        rng.shuffle(order)
        for i in order:
            v = variants[i]
            runs[i][r] = run_variant(em, v, prompts, answers, args.max_new_tokens, args.steps_per_block)
            done += 1
            el = time.perf_counter() - t0
            name = "AR" if v["decoder"] == "ar" else f"diffusion gamma={v['gamma']} S={v['block_size']}"
            print(f"[bench] repeat {r + 1}/{args.repeats} variant {done}/{total}: batch {v['batch_size']} {name}: "
                  f"{runs[i][r]['tokens_per_s']:.1f} tok/s ({el:.0f} s, ETA {el / done * (total - done):.0f} s)",
                  flush=True)
    ar_of = {v["batch_size"]: i for i, v in enumerate(variants) if v["decoder"] == "ar"}
    out = []
    for i, v in enumerate(variants):
        ar = runs[ar_of[v["batch_size"]]]
        ratios = [runs[i][r]["tokens_per_s"] / max(ar[r]["tokens_per_s"], 1e-9) for r in range(args.repeats)]
        first = runs[i][0]
        out.append(v | {"tokens_per_forward": first["tokens"] / max(first["nfe"], 1),
                        "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[i]),
                        "ratio_vs_ar": statistics.median(ratios), "exact_match": first["exact_match"],
                        "mean_batch": first["mean_batch"], "repeats": runs[i]})
    return out


def markdown(variants: list[dict], settings: dict) -> str:
    head = (f"Model `{settings['model']}` (trained block {settings['training_block_size']}); "
            f"{settings['prompts']} prompts from {', '.join(settings['tasks'])}; {settings['max_new_tokens']} new "
            f"tokens; medians of {settings['repeats']} interleaved repeats; x AR = tokens/s over AR's of the same "
            "repeat and batch size.\n\n")
    cols = ["batch", "decoder", "gamma", "block", "tokens/forward", "tokens/s", "x AR", "exact match", "mean batch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v in variants:
        lines.append("| " + " | ".join([
            str(v["batch_size"]), v["decoder"], "" if v["gamma"] is None else f"{v['gamma']:g}",
            "" if v["block_size"] is None else str(v["block_size"]), f"{v['tokens_per_forward']:.2f}",
            f"{v['tokens_per_s']:.1f}", f"{v['ratio_vs_ar']:.2f}", f"{100 * v['exact_match']:.1f}%",
            f"{v['mean_batch']:.1f}"]) + " |")
    return head + "\n".join(lines) + "\n"


def write_outputs(out: str | Path, variants: list[dict], settings: dict) -> tuple[Path, Path, Path]:
    from twotower.training.bench_plot import plot_bench

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "bench.md", out / "bench.json"
    md.write_text(markdown(variants, settings))
    js.write_text(json.dumps({"settings": settings, "variants": variants}, indent=2))
    return md, js, plot_bench(variants, out / "bench.png")


if __name__ == "__main__":
    sys.exit(main())
