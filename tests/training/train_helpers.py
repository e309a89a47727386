"""Compose the real Hydra config with overrides, as ``twotower-train`` does (test helper)."""

from __future__ import annotations


def compose(*overrides: str):
    """``conf/config.yaml`` + overrides -> validated ``TrainConfig`` (as ``twotower-train`` does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from twotower.training.config import register_configs, to_train_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="twotower.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_train_config(cfg)
