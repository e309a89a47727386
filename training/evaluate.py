"""``twotower-eval``: the paper's table for one TwoTower — the same tasks decoded by AR and by diffusion.

    twotower-eval --hf runs/demo/twotower_hf --tokenizer byte --tasks local:runs/demo/tasks --out runs/demo/eval
    twotower-eval --run runs/demo/twotower --tasks local:tasks,gsm8k --gamma 0.8 --block-size 16 --limit 100
    twotower-eval --hf export/x --tasks mmlu --num-fewshot 5 --batch-size 8 --out eval/x

Every task runs through lm-eval-harness's evaluator twice with the model type ``twotower``
(``training/lm_eval_model.py``): once with ``decoder=ar`` (the context tower) and once with the
chosen two-tower decoder (``--decoder diffusion``, gamma, block size, steps per block).
Likelihood tasks (MMLU-style) score through the context tower in both runs. ``--tasks`` takes
lm-eval task names (their datasets must be reachable) and ``local:DIR`` (``DIR/<task>.jsonl``,
lines ``{"prompt": str, "answer": str}``: generate until a newline, exact match after strip).

Writes ``OUT/eval.md`` and ``OUT/eval.json`` (per task: AR score, diffusion score, quality retained,
tokens per forward, tokens/s of both, throughput x AR; the definitions are in
``training/eval_table.py``) and the local tasks' lm-eval YAMLs in ``OUT/tasks/`` (reusable with
``lm_eval --include_path``). Exit codes: 2 bad arguments (unknown task or decoder, gamma not in
(0, inf), counts <= 0); 5 bad input (a model folder that is not a TwoTower, a malformed task file);
both before the model is loaded. A block size larger than the training block only warns (the
paper reports collapse).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from twotower.training.eval_model import EvalUsageError, check_decoder_args, run_command


def add_source_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run", help="twotower-train run directory")
    ap.add_argument("--checkpoint", help="checkpoint folder or a folder of them (with --run: of that run)")
    ap.add_argument("--hf", help="exported / released-format TwoTower folder")
    ap.add_argument("--backbone", help="the context tower's HF folder (checkpoints: default the recorded one)")
    ap.add_argument("--tokenizer", help="override the recorded tokenizer: 'byte', a folder or a tokenizer.json")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names and/or local:DIR")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twotower-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap)
    ap.add_argument("--decoder", default="diffusion", help="the two-tower decoder compared with AR: diffusion or mock_ar")
    ap.add_argument("--gamma", type=float, default=0.8, help="confidence threshold, in (0, inf) (paper: 0.8)")
    ap.add_argument("--block-size", type=int, default=None, help="default: the training block size")
    ap.add_argument("--steps-per-block", type=int, default=None, help="default: the block size")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-gen-toks", type=int, default=64, help="generation budget of the local tasks")
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is often faster on a shared, busy machine)")
    ap.add_argument("--out", required=True, help="folder for eval.md, eval.json and tasks/")
    return ap


def check_counts(ap: argparse.ArgumentParser, args, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')}={value}: must be a positive integer")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    check_counts(ap, args, ("block_size", "steps_per_block", "batch_size", "max_gen_toks", "limit", "threads"))
    if args.decoder not in ("diffusion", "mock_ar"):
        ap.error(f"--decoder={args.decoder!r}: unknown two-tower decoder; use diffusion or mock_ar (AR always runs)")
    try:
        check_decoder_args(args.decoder, args.gamma, args.block_size, args.steps_per_block)
    except EvalUsageError as e:
        ap.error(str(e))
    return run_command("twotower-eval", args, _run)


def _run(args) -> int:
    import logging

    from twotower.training.eval_model import check_source, open_model, warn_block_size
    from twotower.training.local_tasks import select_tasks, task_manager, write_task_yamls

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    sel = select_tasks(args.tasks.split(","))
    check_source(args.run, args.checkpoint, args.hf)
    out = Path(args.out)
    yaml_dir = write_task_yamls(sel.local, out / "tasks", args.max_gen_toks) if sel.local else None
    tm = task_manager(sel, yaml_dir)
    print(f"[eval] loading {args.run or args.checkpoint or args.hf}", flush=True)
    em = open_model(args.run, args.checkpoint, args.hf, args.backbone, args.tokenizer)
    S = args.block_size or em.training_block
    if args.decoder == "diffusion":
        warn_block_size(S, em.training_block)
    settings = {"model": em.source, "decoder": args.decoder, "gamma": args.gamma, "block_size": S,
                "training_block_size": em.training_block, "steps_per_block": args.steps_per_block or S,
                "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks, "limit": args.limit,
                "num_fewshot": args.num_fewshot, "tasks": sel.names}
    rows = evaluate_tasks(em, sel.names, tm, args)
    from twotower.training.eval_table import markdown, write_tables

    md, js = write_tables(out, rows, settings)
    print(markdown(rows, settings), flush=True)
    print(f"[eval] wrote {md} and {js}", flush=True)
    return 0


def evaluate_tasks(em, names: list[str], tm, args) -> list[dict]:
    """Per task: lm-eval's evaluator with ``decoder=ar``, then with ``args.decoder``; one row each."""
    import lm_eval

    from twotower.training.eval_model import warmup
    from twotower.training.eval_table import make_row, primary_metric
    from twotower.training.lm_eval_model import TwoTowerLM

    warmup(em, ["ar", args.decoder], args.block_size or em.training_block)
    rows, t0 = [], time.perf_counter()
    runs = [(name, dec) for name in names for dec in ("ar", args.decoder)]
    scores: dict[tuple[str, str], tuple[str, float, dict]] = {}
    for k, (name, dec) in enumerate(runs):
        lm = TwoTowerLM(model=em, decoder=dec, gamma=args.gamma, block_size=args.block_size,
                        steps_per_block=args.steps_per_block, batch_size=args.batch_size,
                        max_gen_toks=args.max_gen_toks)
        done = time.perf_counter() - t0
        eta = f", ETA {done / k * (len(runs) - k):.0f} s" if k else ""
        print(f"[eval] {k + 1}/{len(runs)} {name} with {dec} ({done:.0f} s{eta})", flush=True)
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=args.limit,
                                      num_fewshot=args.num_fewshot, bootstrap_iters=0, log_samples=False)
        metric, score = primary_metric(res["results"][name])
        scores[(name, dec)] = (metric, score, dict(lm.stats))
    for name in names:
        metric, ar, ar_stats = scores[(name, "ar")]
        _, df, df_stats = scores[(name, args.decoder)]
        rows.append(make_row(name, metric, ar, df, ar_stats, df_stats))
    return rows


if __name__ == "__main__":
    sys.exit(main())
