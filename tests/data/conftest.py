"""Fixtures of the data tests (helpers live in data_helpers.py, importable by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import make_docs, tokenized


@pytest.fixture(scope="session")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Datasets 'web' and 'code' (byte tokenizer, seq_len 64, 8 samples per shard)."""
    tmp = tmp_path_factory.mktemp("blend")
    web = tokenized(tmp, "web", make_docs(300, "web", seed=1))
    code = tokenized(tmp, "code", make_docs(200, "code", seed=2))
    return web, code
