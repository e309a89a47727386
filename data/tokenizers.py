"""Tokenizers behind one small interface (stage: tokenization).

Input: a tokenizer spec string, ``"byte"`` or a local path (a ``tokenizer.json`` file or a Hugging
Face tokenizer directory). Output: an object with ``name``, ``vocab_size``, ``eos_id``, ``pad_id``,
``encode(text) -> list[int]`` and ``encode_batch(texts)``.

The built-in :class:`ByteTokenizer` needs no download (tests, the CPU demo). Its id layout::

    0 = pad, 1 = bos, 2 = eos, 3 = mask (the diffusion mask token the model uses)
    byte b (0..255) -> id b + 4,  vocab_size = 260

Hugging Face tokenizers are loaded from local paths only (this code never touches the network):
a ``tokenizer.json`` goes through ``tokenizers.Tokenizer.from_file`` (fast, no python overhead per
text), a directory through ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

BYTE_SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "mask": 3}
BYTE_OFFSET = len(BYTE_SPECIAL)


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past 4 reserved ids (pad=0, bos=1, eos=2, mask=3); vocab_size 260."""

    name = "byte"
    vocab_size = 256 + BYTE_OFFSET
    pad_id = BYTE_SPECIAL["pad"]
    bos_id = BYTE_SPECIAL["bos"]
    eos_id = BYTE_SPECIAL["eos"]
    mask_id = BYTE_SPECIAL["mask"]

    def encode(self, text: str) -> list[int]:
        # numpy instead of a per-byte python loop: ~50x faster on large documents
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32) + BYTE_OFFSET).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # special ids have no bytes; they are dropped from the text
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


def _special_id(vocab: dict[str, int], candidates: list[str | None]) -> int | None:
    for tok in candidates:
        if tok is not None and tok in vocab:
            return vocab[tok]
    return None


class HFTokenizer:
    """A local Hugging Face tokenizer (``tokenizer.json`` or a tokenizer directory)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.name = str(path)
        self._fast = None
        self._auto = None
        if path.is_file():
            from tokenizers import Tokenizer as _Tok

            self._fast = _Tok.from_file(str(path))
            vocab = self._fast.get_vocab(with_added_tokens=True)
            eos = _special_id(vocab, ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>"])
            pad = _special_id(vocab, ["<pad>", "<|pad|>", "<unk>"])
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        elif path.is_dir():
            from transformers import AutoTokenizer

            self._auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            vocab = self._auto.get_vocab()
            eos = self._auto.eos_token_id
            pad = self._auto.pad_token_id
            # len() counts added tokens too; ids are < len(tok) for HF tokenizers
            self.vocab_size = max(len(self._auto), max(vocab.values()) + 1)
            if self._auto.backend_tokenizer is not None:
                self._fast = self._auto.backend_tokenizer
        else:
            raise FileNotFoundError(
                f"tokenizer {str(path)!r}: no such file or directory; pass 'byte', a tokenizer.json "
                "file, or a local Hugging Face tokenizer directory (downloads are not attempted)"
            )
        if eos is None:
            raise ValueError(
                f"tokenizer {path}: cannot find an end-of-document token (tried </s>, <|endoftext|>, "
                "<eos>, ...); documents are joined with EOS, so the tokenizer must define one"
            )
        self.eos_id = int(eos)
        self.pad_id = int(pad) if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            # add_special_tokens=False: document framing (EOS) is the packer's job, not the tokenizer's
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return self._auto(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are dropped (as :meth:`ByteTokenizer.decode` does)."""
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=True)
        return self._auto.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a local path -> :class:`HFTokenizer`."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def check_vocab(tokenizer_vocab: int, model_vocab: int | None, what: str) -> None:
    """Fail if ids produced by ``what`` may not fit the model's embedding table."""
    if model_vocab is not None and tokenizer_vocab > model_vocab:
        raise ValueError(
            f"{what}: tokenizer vocab_size {tokenizer_vocab} exceeds the model's vocab_size {model_vocab}; "
            "token ids would index past the embedding table. Re-tokenize with the model's tokenizer "
            "or raise the model vocab_size."
        )
