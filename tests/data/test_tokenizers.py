"""The byte tokenizer's reserved ids and the Hugging Face wrapper (checked against `tokenizers` itself)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from twotower.data.tokenize import tokenize_corpus
from twotower.data.tokenizers import ByteTokenizer, HFTokenizer, check_vocab, load_tokenizer


def test_byte_tokenizer_layout():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 1, 2, 3, 260)
    text = "Aé\x00☃"
    ids = tok.encode(text)
    assert ids == [b + 4 for b in text.encode("utf-8")]
    assert min(ids) >= 4 and max(ids) < 260 and tok.decode(ids) == text


def _word_level(tmp_path, n_extra: int = 0):
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "hello": 3, "world": 4}
    vocab.update({f"w{i}": 5 + i for i in range(n_extra)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    return t, path


def test_hf_tokenizer_json(tmp_path):
    ref, path = _word_level(tmp_path)
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (5, 2, 1)
    text = "hello world unknown hello"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids == [3, 4, 0, 3]
    out = tmp_path / "o"
    man = tokenize_corpus([str(_txt(tmp_path, text))], out, str(path), seq_len=4, workers=1)
    assert (man["vocab_size"], man["eos_id"]) == (5, 2) and man["splits"]["train"]["tokens"] == 5


def _txt(tmp_path, text):
    p = tmp_path / "doc.txt"
    p.write_text(text)
    return p


def test_hf_tokenizer_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    _ref, path = _word_level(tmp_path)
    d = tmp_path / "tokdir"
    PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="</s>", pad_token="<pad>").save_pretrained(d)
    tok = load_tokenizer(str(d))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (5, 2, 1)
    assert tok.encode_batch(["world hello", "hello"]) == [[4, 3], [3]]


def test_missing_tokenizer_and_vocab_too_big(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such"):
        load_tokenizer(str(tmp_path / "no-such"))
    check_vocab(260, 260, "x")
    with pytest.raises(ValueError, match="exceeds the model's vocab_size 100"):
        check_vocab(260, 100, "tokenizer byte")
    _, path = _word_level(tmp_path, n_extra=300)
    with pytest.raises(ValueError, match="tokenizer .* vocab_size 305 exceeds"):
        tokenize_corpus([str(_txt(tmp_path, "hello"))], tmp_path / "o", str(path), 8, model_vocab_size=256)
    assert not (tmp_path / "o" / "manifest.json").exists()
