"""Fixtures of the training tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import compose


@pytest.fixture
def compose_config():
    return compose
