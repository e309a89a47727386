"""conf/data YAMLs compose into a valid DataConfig; the synthetic demo corpus is deterministic and
trains end to end through the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from twotower.data.config import DataConfig, register
from twotower.data.loader import build_train_loader, build_valid_loader
from twotower.data.synthetic import generate_documents, prepare_demo_data, write_demo_corpus

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(name: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+data={name}"]).data


@pytest.mark.parametrize("name", ["demo", "blend_2p1t"])
def test_yaml_composes_to_valid_config(name, monkeypatch):
    monkeypatch.setenv("TWOTOWER_DATA", "/data/tok")
    cfg = DataConfig.from_any(_compose(name))
    assert cfg.train and all(d.weight > 0 for d in cfg.train)
    if name == "blend_2p1t":
        assert [d.path for d in cfg.train] == ["/data/tok/web", "/data/tok/code"]
        assert [d.weight for d in cfg.train] == [0.7, 0.3] and cfg.vocab_size == 131072


def test_register_schema():
    register()
    from hydra.core.config_store import ConfigStore

    assert "schema.yaml" in ConfigStore.instance().repo["data"]


def test_demo_corpus_and_loader(tmp_path, monkeypatch):
    assert generate_documents(5, seed=3) == generate_documents(5, seed=3) != generate_documents(5, seed=4)
    files = write_demo_corpus(tmp_path / "raw", n_docs=100)
    assert sum(f.stat().st_size for f in files) > 10_000
    monkeypatch.chdir(tmp_path)
    data = prepare_demo_data(n_docs=400)  # the relative path conf/data/demo.yaml points to
    assert data == Path("runs/demo/data") and (data / "manifest.json").exists()
    cfg = DataConfig.from_any(_compose("demo"))
    batch = next(build_train_loader(cfg, dp_rank=0, dp_size=1, micro_batch_size=4))
    assert batch["tokens"].shape == (4, 256) and int(batch["tokens"].max()) < 260
    assert sum(b["tokens"].shape[0] for b in build_valid_loader(cfg, 0, 1, 8)) > 0
