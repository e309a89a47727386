"""Raw text corpora (stage: input to tokenization).

Input: paths given on the command line: files, directories (searched recursively) or glob patterns.
Output: a sorted list of corpus files and, per file, an iterator of ``(doc_index, text)``.

Formats, chosen by suffix:

* ``.txt``: the whole file is one document (a corpus of many small documents is better as .jsonl);
  an empty (or whitespace-only) file holds no document, like an empty .jsonl.
* ``.jsonl``: one JSON object per line; the document is the ``text_key`` field. Blank lines are ignored.
* ``.parquet``: the ``text_key`` column (read in record batches, so large files stay out of memory).

Text must be UTF-8. Every error names the file (and the line, for .txt and .jsonl, also for bytes
that are not UTF-8) so a bad record can be found and fixed.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, directories and globs -> sorted unique corpus files. An input matching nothing is an error."""
    files: list[Path] = []
    for spec in inputs:
        spec = str(spec)
        if any(ch in spec for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            if not matches:
                raise FileNotFoundError(f"input glob {spec!r} matched no files")
        elif os.path.isdir(spec):
            matches = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"input directory {spec!r} holds no {'/'.join(SUFFIXES)} files")
        elif os.path.isfile(spec):
            matches = [Path(spec)]
        else:
            raise FileNotFoundError(f"input {spec!r}: no such file, directory or glob match")
        for m in matches:
            if m.is_file() and m.suffix not in SUFFIXES:
                raise ValueError(
                    f"input file {m}: unsupported suffix {m.suffix!r}; expected one of {SUFFIXES}"
                )
            if m.is_file():
                files.append(m)
    # sorted + unique: the output must not depend on argument order or shell glob order
    return sorted(set(files))


def iter_documents(path: Path, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """Yield ``(doc_index, text)`` for every document in ``path``."""
    suffix = path.suffix
    if suffix == ".txt":
        raw = path.read_bytes()
        text = _utf8(raw, path, 0)
        if text.strip():
            yield 0, text
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            idx = 0
            for lineno, raw_line in enumerate(f, start=1):
                line = _utf8(raw_line, path, lineno)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict) or text_key not in obj:
                    raise KeyError(f"{path}:{lineno}: record has no {text_key!r} field (set --text-key)")
                text = obj[text_key]
                if not isinstance(text, str):
                    raise TypeError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, not str")
                yield idx, text
                idx += 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_key not in pf.schema_arrow.names:
            raise KeyError(
                f"{path}: parquet file has no column {text_key!r} (columns: {pf.schema_arrow.names})"
            )
        idx = 0
        for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ValueError(f"{path}: row {idx} has a null {text_key!r}")
                yield idx, text
                idx += 1
    else:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; expected one of {SUFFIXES}")


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
    """``raw`` decoded as UTF-8, else a ValueError naming the file, line and column of the bad byte
    (``lineno`` 0: ``raw`` is the whole file and the line is counted here)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if lineno == 0:
            lineno = raw.count(b"\n", 0, exc.start) + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        else:
            col = exc.start + 1
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {col}: {exc.reason}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
