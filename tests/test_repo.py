"""Repository hygiene that has broken CI before: lint, the layout card, untracked test files,
and the YAML configs shipping inside the installed package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"training", "model", "data", "launch", "conf", "tests", "setup.py", "README.md", ".ci",
             ".gitignore"}


def _git(*args: str) -> list[str] | None:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        return None
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.splitlines() if out.returncode == 0 else None


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    out = subprocess.run([str(ruff), "check", "--config", ".ci/ruff.toml", "."], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-4000:]


def test_tracked_top_level_matches_the_layout_card():
    tracked = _git("ls-files")
    if tracked is None:
        pytest.skip("not a git checkout")
    top = {p.split("/", 1)[0] for p in tracked}
    assert top <= TOP_LEVEL, f"unexpected top-level entries: {sorted(top - TOP_LEVEL)}"


def test_no_source_file_is_gitignored():
    """A test script or config hidden by a .gitignore rule (e.g. ``dist/`` catching
    ``tests/*/dist/``) passes here and fails in every fresh clone."""
    ignored = _git("ls-files", "--others", "--ignored", "--exclude-standard", "tests", "conf",
                   "training", "model", "data", "launch")
    if ignored is None:
        pytest.skip("not a git checkout")
    bad = sorted(p for p in ignored if p.endswith((".py", ".yaml", ".json", ".txt")) and "__pycache__" not in p)
    assert not bad, f"ignored by .gitignore, so missing from clones: {bad}"


def test_installed_package_ships_every_config():
    shipped = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    root = resources.files("twotower.conf")
    missing = [name for name in shipped if not root.joinpath(name).is_file()]
    assert shipped and not missing, f"conf files missing from the installed package: {missing}"
