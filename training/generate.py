"""``twotower-generate``: decode from a trained TwoTower run in one of three modes.

    twotower-generate --run runs/demo/twotower --prompt "The cat" --mode diffusion --threshold 0.8
    twotower-generate --run runs/demo/twotower --prompt "The cat" --mode ar --max-new-tokens 64
    twotower-generate --run runs/demo/twotower --prompt-file prompts.txt --mode all

The run directory holds the resolved ``config.yaml`` written by ``twotower-train``; the
context tower is loaded from its ``backbone`` and the denoiser from the newest checkpoint
(or ``--checkpoint``). Prompts are tokenized with the tokenizer recorded in the training
data's manifest (``byte`` for the demo). Prints the text and, per mode, tokens/s and
tokens per denoiser forward (NFE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_run(run_dir: str | Path, checkpoint: str | None = None):
    """(TwoTowerModel with both towers loaded, TrainConfig) for a finished or running run."""
    from omegaconf import OmegaConf

    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.megatron_cpu import init_parallel
    from twotower.model.two_tower import build_two_tower
    from twotower.training.checkpoint import Checkpointer
    from twotower.training.config import to_train_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise SystemExit(f"{run_dir}: no config.yaml (not a twotower-train run directory)")
    cfg = to_train_config(OmegaConf.load(run_dir / "config.yaml"))
    if cfg.objective != "diffusion":
        raise SystemExit(f"{run_dir}: objective={cfg.objective}; generation needs a diffusion (TwoTower) run")
    if checkpoint:
        cfg.checkpoint.resume = checkpoint
    init_parallel()
    model = build_two_tower(cfg.model, cfg.parallel, cfg.twotower)
    if cfg.backbone:
        load_hf_backbone(model.context_tower, cfg.backbone)
        model.init_denoiser_from_context()
    if Checkpointer(cfg.checkpoint).load(model, None, None) is None:
        raise SystemExit(f"{cfg.checkpoint.dir}: no complete checkpoint to load the denoiser from")
    return model.eval(), cfg


def tokenizer_for(cfg):
    from twotower.data.tokenizers import load_tokenizer

    if cfg.data is None:
        return load_tokenizer("byte")
    manifest = json.loads((Path(cfg.data.train[0].path) / "manifest.json").read_text())
    return load_tokenizer(manifest["tokenizer"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="twotower-train run directory")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file", help="one prompt per line")
    ap.add_argument("--mode", choices=["diffusion", "mock_ar", "ar", "all"], default="diffusion")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None, help="default: the training block size")
    ap.add_argument("--steps-per-block", type=int, default=None, help="default: the block size")
    ap.add_argument("--threshold", type=float, default=0.8, help="confidence threshold gamma")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0, help="AR / mock-AR sampling: keep the k best (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="AR / mock-AR sampling: nucleus mass")
    args = ap.parse_args(argv)
    import torch

    from twotower.training.quiet import quiet_third_party

    quiet_third_party()
    model, cfg = load_run(args.run, args.checkpoint)
    tok = tokenizer_for(cfg)
    prompts = [args.prompt] if args.prompt else Path(args.prompt_file).read_text().splitlines()
    S = args.block_size or cfg.twotower.block_size
    modes = ["diffusion", "mock_ar", "ar"] if args.mode == "all" else [args.mode]
    if "diffusion" in modes and args.max_new_tokens % S:
        ap.error(f"--max-new-tokens={args.max_new_tokens} must be a multiple of the block size {S} for "
                 f"diffusion decoding (e.g. {-(-args.max_new_tokens // S) * S})")
    kw = dict(block_size=S, steps_per_block=args.steps_per_block or S, mask_token_id=cfg.twotower.mask_token_id,
              confidence_threshold=args.threshold)
    # Decoding shapes change every step: megatron's torch.compile'd fusions (squared ReLU, ...)
    # would recompile until dynamo's limit for no gain at these sizes, so run them eagerly.
    with torch.compiler.set_stance("force_eager"):
        _decode_all(model, tok, prompts, modes, args, kw)


def _decode_all(model, tok, prompts, modes, args, kw) -> None:
    import torch

    from twotower.model.decoding import generate_ar, generate_mask_diffusion, generate_mock_ar

    common = dict(temperature=args.temperature, eos_token_id=tok.eos_id)
    sampling = dict(common, top_k=args.top_k, top_p=args.top_p)
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
        for mode in modes:
            if mode == "ar":
                out = generate_ar(model, ids, args.max_new_tokens, **sampling)
            elif mode == "mock_ar":
                out = generate_mock_ar(model, ids, args.max_new_tokens, **sampling)
            else:
                out = generate_mask_diffusion(model, ids, args.max_new_tokens, **kw, **common)
            new = out.sequences[0, ids.shape[1]:].tolist()
            if tok.eos_id in new:  # the decoders keep a block whole after eos; show text up to it
                new = new[:new.index(tok.eos_id)]
            text = tok.decode(new)
            print(f"[{mode:9s}] {out.tokens_per_second:8.1f} tok/s  {out.tokens_per_nfe:5.2f} tok/NFE  "
                  f"{prompt!r} -> {text!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
