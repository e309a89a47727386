"""One TwoTower opened for evaluation, and its three decoders behind one call.

Stage: evaluation (``twotower-eval``, ``twotower-bench-decode``, the lm-eval model ``twotower``).
Input: a model source (a ``twotower-train`` run directory, a checkpoint, or an exported /
released-format folder ``--hf``) checked to be a TwoTower before anything is built, and a tokenizer.
Output: :class:`EvalModel`; :func:`decode` runs ``diffusion`` (``generate_mask_diffusion``),
``mock_ar`` or ``ar`` from ``model/decoding.py`` on a batch of equal-length prompts and returns the
decoder's own counters (``GenerationOutput``: generated tokens, forwards of the generating tower,
seconds).

Why equal-length batches: the release's decoders take ``input_ids [b, P]`` without a padding
mask, so padding would change what the towers read (Mamba states run over pad tokens). Callers
group prompts by length (:func:`length_batches`); a result never depends on which prompts
share its batch, except for what the release itself shares across a batch (diffusion's
batch-mean time and its stop after the block where any row emitted eos).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DECODERS = ("diffusion", "ar", "mock_ar")


class EvalUsageError(ValueError):
    """A meaningless argument (unknown decoder or task, gamma out of range...): exit code 2."""


class EvalInputError(ValueError):
    """A bad input file or folder (not a TwoTower, a malformed task file): exit code 5."""


def run_command(prog: str, args, run: Callable[[object], int]) -> int:
    """The shared body of ``twotower-eval`` / ``twotower-bench-decode`` after argument checks:
    the CPU runtime layer (no-op on CUDA hosts) before megatron is imported, ``--threads``, then
    ``run(args)``; usage errors exit 2, bad input files 5; the process group is always torn down."""
    import sys

    from twotower.training.quiet import quiet_third_party

    quiet_third_party()
    from twotower.model import megatron_cpu

    megatron_cpu.apply()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except EvalUsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except EvalInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 5
    finally:
        from twotower.model.parallel_init import destroy_parallel

        destroy_parallel()  # a no-op when no model was loaded


def check_decoder_args(decoder: str, gamma: float, block_size: int | None, steps_per_block: int | None) -> None:
    """Refuse a decoder setting that cannot run, before any model is loaded (:class:`EvalUsageError`).

    ``gamma`` is the confidence threshold: any value in (0, inf); gamma >= 1 never finds a
    position confident enough, so diffusion commits exactly one token per forward."""
    if decoder not in DECODERS:
        raise EvalUsageError(f"decoder={decoder!r}: unknown decoder; use one of {', '.join(DECODERS)}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise EvalUsageError(f"gamma={gamma}: the confidence threshold must be in (0, inf) (the paper: 0.8; "
                             "gamma > 1 decodes one token per denoiser forward)")
    for name, value in (("block_size", block_size), ("steps_per_block", steps_per_block)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalUsageError(f"{name}={value}: must be a positive integer")


def check_source(run: str | None, checkpoint: str | None, hf: str | None) -> None:
    """Name what is wrong with a model source without building anything (:class:`EvalInputError`)."""
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.model.released_format import checkpoint_kind

    if sum(x is not None for x in (run, hf)) + (checkpoint is not None and run is None) != 1:
        raise EvalUsageError("give exactly one model source: run=DIR [checkpoint=...], checkpoint=DIR, or hf=DIR")
    if hf is not None:
        folder = Path(hf)
        if not folder.is_dir():
            raise EvalInputError(f"hf={folder}: no such folder")
        try:
            kind = checkpoint_kind(folder)
        except (CheckpointKeyError, json.JSONDecodeError, OSError) as e:
            raise EvalInputError(f"hf={folder}: not a TwoTower folder ({_message(e)})") from None
        if kind != "twotower":
            raise EvalInputError(f"hf={folder}: a NemotronH backbone (no denoiser_tower), not a TwoTower; "
                                 "evaluate an exported TwoTower (twotower-convert export-hf)")
        return
    path = Path(run if run is not None else checkpoint)
    if not path.exists():
        raise EvalInputError(f"{'run' if run is not None else 'checkpoint'}={path}: no such file or folder")
    if run is not None and not (path / "config.yaml").exists():
        raise EvalInputError(f"run={path}: no config.yaml (not a twotower-train run directory)")


def _message(e: BaseException) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


@dataclass
class EvalModel:
    model: object
    """``TwoTowerModel`` in eval mode."""
    tokenizer: object
    """A ``twotower.data.tokenizers`` tokenizer (``encode``, ``decode``, ``eos_id``)."""
    training_block: int
    """The block size the denoiser was trained with (sampling larger blocks collapses)."""
    mask_token_id: int
    vocab_size: int
    source: str


def open_model(run: str | None = None, checkpoint: str | None = None, hf: str | None = None,
               backbone: str | None = None, tokenizer: str | None = None) -> EvalModel:
    """Check the source (:func:`check_source`), load it (``load_for_inference``) and its tokenizer
    (``tokenizer`` overrides the one the source records, e.g. ``"byte"`` for a folder exported
    without tokenizer files)."""
    from twotower.data.tokenizers import load_tokenizer
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.training.checkpoint import CheckpointError
    from twotower.training.inference_model import load_for_inference

    check_source(run, checkpoint, hf)
    try:
        loaded = load_for_inference(run, checkpoint, hf, backbone)
    except (CheckpointError, CheckpointKeyError, FileNotFoundError) as e:
        raise EvalInputError(_message(e)) from None
    spec = tokenizer or loaded.tokenizer
    if spec is None:
        raise EvalUsageError(f"{run or checkpoint or hf}: records no tokenizer; pass tokenizer=byte or a "
                             "tokenizer folder (--tokenizer)")
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"tokenizer {spec}: {e}") from None
    vocab = loaded.model.backbone.vocab_size
    if tok.vocab_size > vocab:
        raise EvalInputError(f"tokenizer {spec}: {tok.vocab_size} tokens do not fit the model's vocab_size {vocab}")
    return EvalModel(loaded.model, tok, loaded.twotower.block_size, loaded.twotower.mask_token_id, vocab,
                     str(run or checkpoint or hf))


def warn_block_size(block_size: int, training_block: int) -> None:
    """Sampling with blocks larger than the training block collapses (paper: S 16 -> 64 took GSM8K
    from 89.8 to 2.2); allowed, but said loudly."""
    if block_size > training_block:
        warnings.warn(f"block size {block_size} is larger than the block the denoiser was trained with "
                      f"({training_block}); the paper reports quality collapse at larger sampling blocks",
                      stacklevel=2)


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` grouped by equal length, at most ``batch_size`` per group, in order of
    first appearance (see the module docstring for why no padding)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def decode(em: EvalModel, decoder: str, prompts: list[list[int]], max_new_tokens: int, *, gamma: float = 0.8,
           block_size: int | None = None, steps_per_block: int | None = None, temperature: float = 0.0,
           stop: Callable[[list[list[int]]], bool] | None = None):
    """Decode a batch of equal-length prompts; returns ``(generated ids per row, GenerationOutput)``.

    Diffusion decodes whole blocks (``max_new_tokens`` rounded up to a multiple of the block size,
    as Megatron's engine does); rows are cut back to ``max_new_tokens`` here, the counters keep
    what the decoder generated. ``stop(rows)`` sees the generated ids so far (after every block or
    token) and ends decoding early when it returns True; eos ends it (batches: once every row emitted one)."""
    import torch

    from twotower.model.decoding import generate_ar, generate_mask_diffusion, generate_mock_ar

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("decode() takes prompts of one length (group them with length_batches)")
    ids = torch.tensor(prompts, dtype=torch.long)
    eos = em.tokenizer.eos_id
    if len(prompts) > 1 and eos is not None:
        # The release's decoders end a whole batch once any row emits eos; scored rows must each run to
        # their own end, so a batch ends when every row has emitted eos (or ``stop`` says so).
        stop = _every_row_ended(eos, stop)
        eos = None
    hook = None if stop is None else (lambda gen: stop(gen.tolist()))
    # Shapes change every step: megatron's torch.compile'd fusions would only recompile (generate.py).
    with torch.compiler.set_stance("force_eager"):
        if decoder == "ar":
            out = generate_ar(em.model, ids, max_new_tokens, temperature=temperature, eos_token_id=eos, stop=hook)
        elif decoder == "mock_ar":
            out = generate_mock_ar(em.model, ids, max_new_tokens, temperature=temperature, eos_token_id=eos,
                                   stop=hook)
        else:
            S = block_size or em.training_block
            out = generate_mask_diffusion(em.model, ids, -(-max_new_tokens // S) * S, block_size=S,
                                          steps_per_block=steps_per_block or S, mask_token_id=em.mask_token_id,
                                          temperature=temperature, confidence_threshold=gamma, eos_token_id=eos,
                                          stop=hook)
    rows = out.sequences[:, ids.shape[1]:ids.shape[1] + max_new_tokens].tolist()
    return rows, out


def _every_row_ended(eos: int, stop: Callable[[list[list[int]]], bool] | None):
    def ended(rows: list[list[int]]) -> bool:
        return all(eos in r for r in rows) or (stop is not None and stop(rows))
    return ended


def text_until(em: EvalModel, ids: list[int], until: list[str]) -> str:
    """The text of ``ids`` up to eos, cut before the first of the ``until`` strings."""
    eos = em.tokenizer.eos_id
    if eos in ids:
        ids = ids[:ids.index(eos)]
    text = em.tokenizer.decode(ids)
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text


def needed_tokens(em: EvalModel, ids: list[int], until: list[str]) -> int:
    """How many of ``ids`` a decoder needed for its answer: up to and including the token that
    completed eos or the first ``until`` string, else all (tokens after the stop are not counted)."""
    for k in range(1, len(ids) + 1):
        if finished(em, ids[:k], until):
            return k
    return len(ids)


def warmup(em: EvalModel, decoders: list[str], block_size: int) -> None:
    """One short decode per decoder, so that one-time costs do not land in the first timing."""
    for dec in decoders:
        decode(em, dec, [[em.tokenizer.eos_id] * 4], block_size, block_size=block_size)


def finished(em: EvalModel, ids: list[int], until: list[str]) -> bool:
    """Whether a row has emitted eos or one of the ``until`` strings."""
    if em.tokenizer.eos_id in ids:
        return True
    text = em.tokenizer.decode(ids)
    return any(s and s in text for s in until)
