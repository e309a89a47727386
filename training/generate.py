"""``twotower-generate``: decode from a trained TwoTower in the release's three modes.

    twotower-generate --run runs/demo/twotower --prompt "The cat" --mode diffusion --gamma 0.8
    twotower-generate --checkpoint runs/x/checkpoints --prompt "The cat" --mode ar --max-new-tokens 64
    twotower-generate --hf export/x --input-ids 5,17,42 --mode all --stats --output-ids
    twotower-generate --run runs/demo/twotower --prompt-file prompts.txt --mode all

Sources: a ``twotower-train`` run directory (``--checkpoint`` then picks one of its
checkpoints), a checkpoint (or a folder of them), or an exported / released-format folder
(``--hf``). Prompts are text (tokenized with the tokenizer the source records: the training
data's manifest, or the folder's tokenizer files) or token ids (``--input-ids``, for models
without a tokenizer). Per mode it prints the text, or with ``--stats`` one JSON line with
``tokens``, ``nfe``, ``tokens_per_nfe``, ``seconds``, ``tokens_per_s`` (and ``ids`` with
``--output-ids``). Exit code 2: bad arguments (an empty or non-UTF-8 prompt, a count <= 0, a
threshold or sampling parameter out of range: all refused before any model is built); 5: bad
checkpoint or folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twotower-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="twotower-train run directory")
    ap.add_argument("--checkpoint", help="checkpoint folder or a folder of them (with --run: of that run)")
    ap.add_argument("--hf", help="exported / released-format Hugging Face folder")
    ap.add_argument("--backbone", help="the context tower's HF folder (default: the one the checkpoint records)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file", help="one prompt per line")
    src.add_argument("--input-ids", help="comma-separated token ids of one prompt, e.g. 5,17,42")
    ap.add_argument("--mode", choices=["diffusion", "mock_ar", "ar", "all"], default="diffusion")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None, help="default: the training block size")
    ap.add_argument("--steps-per-block", type=int, default=None, help="default: the block size")
    ap.add_argument("--gamma", "--threshold", dest="gamma", type=float, default=0.8,
                    help="confidence threshold (the paper's operating point: 0.8)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0, help="AR / mock-AR sampling: keep the k best (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="AR / mock-AR sampling: nucleus mass")
    ap.add_argument("--stats", action="store_true", help="one JSON line of counters per prompt and mode")
    ap.add_argument("--output-ids", action="store_true", help="print the generated token ids")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    args.prompts = _check_arguments(ap, args)
    if sum(x is not None for x in (args.run, args.hf)) + (args.checkpoint is not None and args.run is None) != 1:
        ap.error("give exactly one source: --run [--checkpoint], --checkpoint, or --hf")
    ids = None
    if args.input_ids:
        try:
            ids = [int(x) for x in args.input_ids.replace(" ", "").split(",") if x]
        except ValueError:
            ap.error(f"--input-ids={args.input_ids!r}: expected comma-separated integers")
        if not ids:
            ap.error("--input-ids is empty")
    from twotower.training.quiet import quiet_third_party

    quiet_third_party()
    from twotower.model import megatron_cpu

    megatron_cpu.apply()  # the CPU runtime layer (no-op on CUDA hosts), before megatron is imported
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.checkpoint import CheckpointError

    try:
        return _run(ap, args, ids)
    except (CheckpointError, CheckpointKeyError, FileNotFoundError) as e:
        print(f"twotower-generate: error: {e}", file=sys.stderr)
        return 5
    finally:
        destroy_parallel()


def _check_arguments(ap: argparse.ArgumentParser, args) -> list[str] | None:
    """Refuse meaningless arguments before anything is loaded (``ap.error``: exit 2). Returns the
    text prompts (``--prompt`` / ``--prompt-file``), checked to be non-empty UTF-8."""
    for name in ("max_new_tokens", "block_size", "steps_per_block"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            ap.error(f"--{name.replace('_', '-')}={value}: must be a positive integer")
    if not (math.isfinite(args.gamma) and 0.0 <= args.gamma <= 1.0):
        ap.error(f"--gamma={args.gamma}: the confidence threshold is a probability, in [0, 1] (the paper: 0.8)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        ap.error(f"--temperature={args.temperature}: must be >= 0 (0: greedy)")
    if args.top_k < 0:
        ap.error(f"--top-k={args.top_k}: must be >= 0 (0: all tokens)")
    if not (math.isfinite(args.top_p) and 0.0 < args.top_p <= 1.0):
        ap.error(f"--top-p={args.top_p}: must be in (0, 1]")
    if args.prompt is not None:
        if not args.prompt.strip():
            ap.error("--prompt is empty")
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 on the command line (surrogate escapes)
            ap.error(f"--prompt {args.prompt.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 text")
        return [args.prompt]
    if args.prompt_file is not None:
        return _prompt_lines(ap, Path(args.prompt_file))
    return None


def _prompt_lines(ap: argparse.ArgumentParser, path: Path) -> list[str]:
    """One prompt per line of ``path``: UTF-8, none of them empty (errors name the file and line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        ap.error(f"--prompt-file {path}: {e.strerror or e}")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        ap.error(f"--prompt-file {path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})")
    if not lines:
        ap.error(f"--prompt-file {path} is empty: give one prompt per line")
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            ap.error(f"--prompt-file {path}:{i}: empty prompt (one prompt per line, no blank lines)")
    return lines


def _run(ap, args, ids) -> int:
    import torch

    from twotower.training.inference_model import load_for_inference

    loaded = load_for_inference(args.run, args.checkpoint, args.hf, args.backbone)
    S = args.block_size or loaded.twotower.block_size
    modes = ["diffusion", "mock_ar", "ar"] if args.mode == "all" else [args.mode]
    if "diffusion" in modes and args.max_new_tokens % S:
        ap.error(f"--max-new-tokens={args.max_new_tokens} must be a multiple of the block size {S} for "
                 f"diffusion decoding (e.g. {-(-args.max_new_tokens // S) * S})")
    tok = None
    if ids is None:
        if loaded.tokenizer is None:
            ap.error("this model records no tokenizer: give --input-ids (or export it with --tokenizer)")
        from twotower.data.tokenizers import load_tokenizer

        tok = load_tokenizer(loaded.tokenizer)
        texts = args.prompts
        prompts = [(text, tok.encode(text)) for text in texts]
    else:
        prompts = [(None, ids)]
    vocab = loaded.model.backbone.vocab_size
    for _, p in prompts:
        if not p or min(p) < 0 or max(p) >= vocab:
            ap.error(f"prompt ids must be non-empty and in [0, {vocab}) (the model's vocab_size)")
    # Decoding shapes change every step: megatron's torch.compile'd fusions (squared ReLU, ...)
    # would recompile until dynamo's limit for no gain at these sizes, so run them eagerly.
    with torch.compiler.set_stance("force_eager"):
        _decode_all(loaded, tok, prompts, modes, args, S)
    return 0


def _decode_all(loaded, tok, prompts, modes, args, S: int) -> None:
    import torch

    from twotower.model.decoding import generate_ar, generate_mask_diffusion, generate_mock_ar

    eos = tok.eos_id if tok is not None else None
    common = dict(temperature=args.temperature, eos_token_id=eos)
    sampling = dict(common, top_k=args.top_k, top_p=args.top_p)
    model = loaded.model
    for text, prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        for mode in modes:
            if mode == "ar":
                out = generate_ar(model, ids, args.max_new_tokens, **sampling)
            elif mode == "mock_ar":
                out = generate_mock_ar(model, ids, args.max_new_tokens, **sampling)
            else:
                out = generate_mask_diffusion(model, ids, args.max_new_tokens, block_size=S,
                                              steps_per_block=args.steps_per_block or S,
                                              mask_token_id=loaded.twotower.mask_token_id,
                                              confidence_threshold=args.gamma, **common)
            new = out.sequences[0, ids.shape[1]:].tolist()
            if args.stats:
                row = {"mode": mode, "tokens": out.new_tokens, "nfe": out.nfe,
                       "tokens_per_nfe": round(out.tokens_per_nfe, 4), "seconds": round(out.seconds, 4),
                       "tokens_per_s": round(out.tokens_per_second, 2)}
                print(json.dumps(row | ({"ids": new} if args.output_ids else {})), flush=True)
                continue
            if args.output_ids:
                print(f"[{mode:9s}] " + ",".join(map(str, new)), flush=True)
            if tok is not None:
                if eos in new:  # the decoders keep a block whole after eos; show text up to it
                    new = new[:new.index(eos)]
                print(f"[{mode:9s}] {out.tokens_per_second:8.1f} tok/s  {out.tokens_per_nfe:5.2f} tok/NFE  "
                      f"{text!r} -> {tok.decode(new)!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
