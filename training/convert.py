"""``twotower-convert``: Hugging Face <-> TwoTower checkpoints in the released format, at any layout.

    # a Nemotron-H backbone -> an initial TwoTower checkpoint (both towers = the backbone,
    # adaLN-single at its identity init); train from it with checkpoint.init_from=CKPT
    twotower-convert import-hf --hf NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 --output ckpts/init
    # NVIDIA's released TwoTower -> a checkpoint of its denoiser + adaLN (continue training it:
    #   twotower-train ... backbone=RELEASED_DIR checkpoint.init_from=ckpts/released)
    twotower-convert import-hf --hf Nemotron-Labs-TwoTower-30B-A3B-Base-BF16 --output ckpts/released
    # a checkpoint (any layout it was trained at) -> a released-layout folder that
    # AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads without twotower
    twotower-convert export-hf --checkpoint runs/x/checkpoints --output export/x --tokenizer TOKDIR --verify
    twotower-convert export-hf --checkpoint runs/x/checkpoints --output export/x-ar --backbone-only
    # an objective=ar run (pretraining the backbone) -> the NemotronHForCausalLM folder that
    # twotower-train backbone=... takes as its frozen context tower
    twotower-convert export-hf --checkpoint runs/ar/checkpoints --output export/ar --backbone-only --dtype fp32
    # the 30B model: shard the conversion over one node (each rank reads only its slices)
    torchrun --nproc_per_node 8 -m twotower.training.convert import-hf --hf DIR --output CKPT --ep 8

A checkpoint argument is a checkpoint folder (``.../step_00001000``) or a folder of them (the
newest complete one is used). Exit codes: 2 bad arguments, 5 bad checkpoint / folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from twotower.training.quiet import quiet_third_party

quiet_third_party()  # before megatron is imported (its notices fire at import time)

from twotower.model.released_export import DTYPE_NAMES as DTYPES

EXIT_BAD_INPUT = 5


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twotower-convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF NemotronH backbone or released TwoTower folder -> checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face folder (NemotronHForCausalLM or the released TwoTower)")
    imp.add_argument("--output", required=True, help="checkpoint root to create (holds step_00000000)")
    imp.add_argument("--block-size", type=int, default=16, help="twotower.block_size recorded with the model")
    imp.add_argument("--mask-token-id", type=int, default=3)
    imp.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype of the checkpoint")
    exp = sub.add_parser("export-hf", help="checkpoint -> released-layout HF folder")
    exp.add_argument("--checkpoint", required=True, help="checkpoint folder, or a folder of them (newest used)")
    exp.add_argument("--output", required=True, help="folder to create")
    exp.add_argument("--backbone", help="the context tower's source (default: the one recorded in the checkpoint)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    exp.add_argument("--tokenizer", help="folder with the tokenizer files to ship with the export")
    exp.add_argument("--backbone-only", action="store_true", help="the context tower as a NemotronHForCausalLM")
    exp.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard")
    exp.add_argument("--verify", action="store_true", help="reload with transformers and compare")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    for p in (imp, exp):
        p.add_argument("--tp", type=int, default=1, help="tensor parallel size of this conversion run")
        p.add_argument("--ep", type=int, default=1, help="expert parallel size of this conversion run")
    return ap


class ConvertError(RuntimeError):
    """Bad input to a conversion; the message names the file, key or field."""


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    from twotower.model import megatron_cpu

    megatron_cpu.apply()  # the CPU runtime layer (no-op on CUDA hosts), before megatron is imported
    from twotower.model.config import ConfigError
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.checkpoint import CheckpointError
    from twotower.training.export_verify import VerifyError

    try:
        if args.command == "import-hf":
            out = import_hf(args)
        else:
            out = export_hf(args)
    except (ConfigError, ValueError) as e:
        print(f"twotower-convert: error: {e}", file=sys.stderr)
        return 2
    except (ConvertError, CheckpointError, CheckpointKeyError, FileNotFoundError, VerifyError) as e:
        print(f"twotower-convert: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        destroy_parallel()
    if out is not None:
        print(out, flush=True)
    return 0


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConvertError(f"{path} exists and is not empty; pass --overwrite to replace it")


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _setup(backbone, twotower, args, dtype_name: str = "fp32"):
    import torch

    from twotower.model.config import ParallelConfig
    from twotower.model.parallel_init import init_parallel
    from twotower.model.two_tower import build_two_tower

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, sequence_parallel=args.tp > 1)
    backbone.validate_parallel(parallel)
    twotower.validate(backbone)
    init_parallel(tp=args.tp, ep=args.ep)
    dtype = getattr(torch, DTYPES[dtype_name])
    return build_two_tower(backbone, parallel, twotower, params_dtype=dtype)


# ------------------------------------------------------------------------------------------ import
def import_hf(args) -> Path | None:
    """HF folder -> a model-only distributed checkpoint (step 0) under ``args.output``."""
    from twotower.model.config import BackboneConfig
    from twotower.model.hf_import import load_hf_backbone
    from twotower.model.released_format import checkpoint_kind, load_released_twotower
    from twotower.model.two_tower import TwoTowerConfig
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer

    src, out = Path(args.hf), Path(args.output)
    kind = checkpoint_kind(src)
    _check_target(out, overwrite=False)
    backbone = BackboneConfig.from_hf(src)
    twotower = TwoTowerConfig(block_size=args.block_size, mask_token_id=args.mask_token_id)
    model = _setup(backbone, twotower, args, args.dtype)
    if kind == "twotower":
        load_released_twotower(model, src)
    else:
        load_hf_backbone(model.context_tower, src)
        model.init_denoiser_from_context()
    extra = {"source": str(src.resolve()), "source_kind": kind,
             "config": {"objective": "diffusion", "backbone": str(src.resolve()),
                        "model": dataclasses.asdict(backbone),
                        "twotower": dataclasses.asdict(twotower)}}
    path = Checkpointer(CheckpointConfig(dir=str(out), keep_last=0)).save(0, model, None, None, extra)
    return path if _rank() == 0 else None


# ------------------------------------------------------------------------------------------ export
def export_hf(args) -> Path | None:
    import torch

    from twotower.model.released_format import iter_released_tensors, load_context_tower
    from twotower.model.safetensors_writer import ShardedSafetensorsWriter
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer, find_checkpoint
    from twotower.training.inference_model import saved_model_config

    out = Path(args.output)
    _check_target(out, args.overwrite)
    if args.verify and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConvertError("--verify needs a single-process export (run without torchrun)")
    ckpt = find_checkpoint(args.checkpoint)
    backbone, twotower, backbone_src, _ = saved_model_config(ckpt, args.backbone, allow_ar=True)
    ar = backbone_src is None  # an objective=ar checkpoint: the backbone itself
    if ar and not args.backbone_only:
        raise ConvertError(f"{ckpt}: an objective=ar checkpoint holds the backbone alone; export it with "
                           "--backbone-only (a NemotronHForCausalLM folder)")
    if ar and args.backbone:
        raise ConvertError(f"--backbone: {ckpt} is an objective=ar checkpoint, it is the backbone itself")
    tok = _tokenizer_files(args.tokenizer, backbone.vocab_size) if args.tokenizer else []
    model = _setup(backbone, twotower, args)
    checkpointer = Checkpointer(CheckpointConfig(dir=str(ckpt.parent)))
    if ar:  # the AR run's model is the context tower's architecture: its weights load there
        checkpointer.load_weights(model.context_tower, ckpt)
    else:
        load_context_tower(model.context_tower, backbone_src)
        checkpointer.load_weights(model, ckpt)
    model.eval()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer = None
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        dtype = getattr(torch, DTYPES[args.dtype])
        # the router's score-correction bias decides expert choice: kept in fp32
        writer = ShardedSafetensorsWriter(tmp, int(args.max_shard_size * 1e9), dtype,
                                          keep_dtype=("e_score_correction_bias",))
    try:
        for name, tensor in iter_released_tensors(model, backbone_only=args.backbone_only):
            if writer is not None:
                writer.add(name, tensor)
        if writer is None:
            return None
        writer.close()
        from twotower.model.released_export import write_export_metadata

        write_export_metadata(tmp, backbone, backbone_src, args.dtype, args.backbone_only, twotower, tok)
        if args.verify:
            from twotower.training.export_verify import verify_export

            verify_export(tmp, model, args.backbone_only, getattr(torch, DTYPES[args.dtype]))
    except BaseException:
        if writer is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    _replace(tmp, out)
    return out


def _tokenizer_files(path: str, vocab_size: int) -> list[Path]:
    """The tokenizer files of ``path``, checked against the model's vocabulary."""
    from twotower.data.tokenizers import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise ConvertError(f"--tokenizer {p}: not a folder of tokenizer files")
    n = load_tokenizer(str(p)).vocab_size
    if n > vocab_size:
        raise ConvertError(f"--tokenizer {p}: vocabulary of {n} tokens does not fit the model's vocab_size "
                           f"{vocab_size}")
    return [f for f in sorted(p.iterdir()) if f.is_file() and f.name != "config.json"
            and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                 or f.suffix in (".model", ".tiktoken"))]


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; an old ``out`` is removed only after that succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.replace(old)
    tmp.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
