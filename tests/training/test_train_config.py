"""The Hydra config tree composes, and impossible settings fail before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twotower.model.config import ConfigError

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("experiment", ["smoke_cpu", "demo", "demo_ar", "twotower_nano_2p1t",
                                        "twotower_nano_2p1t_phase2", "twotower_nano_2p1t_phase3"])
def test_every_experiment_composes_and_validates(compose_config, experiment):
    cfg = compose_config(f"experiment={experiment}")
    world = cfg.cluster.nodes * max(cfg.cluster.gpus_per_node, 1)
    plan = cfg.validate(world)
    assert plan.num_microbatches * plan.micro_batch_size * plan.dp == cfg.trainer.global_batch_size


def test_nano_experiment_is_the_papers_three_phase_recipe(compose_config):
    """Phases S=32, S=32, S=16 with the release recipe and a fresh WSD 1e-4 -> 1e-6 each; every
    phase starts (weights only) from the previous phase's final checkpoint; ~2.1T tokens in all."""
    names = ["twotower_nano_2p1t", "twotower_nano_2p1t_phase2", "twotower_nano_2p1t_phase3"]
    cfgs = [compose_config(f"experiment={n}") for n in names]
    assert [c.twotower.block_size for c in cfgs] == [32, 32, 16]
    tokens = 0
    for k, cfg in enumerate(cfgs):
        assert cfg.model.num_layers == 52 and cfg.parallel.ep == 16
        assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 512
        plan = cfg.validate(512)
        assert plan.dp == 512 and plan.num_microbatches == 6
        d = cfg.diffusion
        assert (d.time_per, d.loss_weighting, d.antithetic, d.min_masked_per_block, d.eps) == (
            "sequence", "masked_mean", False, 0, 1e-3)
        assert (cfg.optim.schedule, cfg.optim.lr, cfg.optim.min_lr) == ("wsd", 1e-4, 1e-6)
        tokens += cfg.trainer.max_steps * cfg.trainer.global_batch_size * cfg.trainer.seq_len
        if k:
            prev = cfgs[k - 1]
            assert cfg.checkpoint.init_from == f"{prev.checkpoint.dir}/step_{prev.trainer.max_steps:08d}"
            assert cfg.checkpoint.dir != prev.checkpoint.dir
    assert cfgs[0].checkpoint.init_from is None
    assert 2.0e12 < tokens < 2.2e12
    assert cfgs[1].data.train[0].path != cfgs[0].data.train[0].path  # phase 2 changes the blend


def test_overrides_reach_the_dataclasses(compose_config):
    cfg = compose_config("experiment=smoke_cpu", "trainer.max_steps=7", "parallel=tp2", "objective=ar",
                         "checkpoint.resume=none", "optim=wsd")
    assert (cfg.trainer.max_steps, cfg.parallel.tp, cfg.objective, cfg.checkpoint.resume) == (7, 2, "ar", "none")
    assert cfg.optim.schedule == "wsd" and cfg.parallel.sequence_parallel


@pytest.mark.parametrize("overrides,world,msg", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 3, "world size 3 is not divisible"),
    (["parallel.tp=3", "parallel.sequence_parallel=true"], 3, "parallel.tp=3 does not divide"),
    (["parallel.ep=3"], 3, "parallel.ep=3 does not divide model.num_experts"),
    (["parallel.pp=3"], 3, "parallel.pp=3 does not divide the 8 layers"),
    (["trainer.global_batch_size=6"], 4, "trainer.global_batch_size=6 is not divisible"),
    (["twotower.block_size=24"], 1, "not a multiple of twotower.block_size=24"),
    (["twotower.mask_token_id=999"], 1, "twotower.mask_token_id=999 is outside the vocabulary"),
])
def test_impossible_layouts_are_refused(compose_config, overrides, world, msg):
    cfg = compose_config("experiment=smoke_cpu", *overrides)
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        cfg.validate(world)


@pytest.mark.parametrize("override,msg", [
    ("diffusion.t_max=1.5", r"diffusion\.t_max=1\.5 is outside \[0, 1\]"),
    ("optim.schedule=linear", r"optim\.schedule='linear'"),
    ("model.pattern=M*Q", r"unknown layer symbol"),
    ("twotower.adaln_init=zero", r"twotower\.adaln_init='zero': use one of identity, release"),
    ("diffusion.loss_weighting=elbo", r"diffusion\.loss_weighting='elbo': use one of nelbo, unweighted, masked_mean"),
])
def test_bad_values_are_refused(compose_config, override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose_config("experiment=smoke_cpu", override)


def test_unknown_key_is_refused(compose_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose_config("experiment=smoke_cpu", "trainer.max_stepz=3")


def test_cli_fails_fast_with_a_named_key(tmp_path):
    env = dict(os.environ, WORLD_SIZE="1")
    out = subprocess.run([sys.executable, "-m", "twotower.training.train", "experiment=smoke_cpu",
                          "parallel.ep=3", f"trainer.run_dir={tmp_path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "parallel.ep=3 does not divide model.num_experts" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_multirun_sweeps_in_one_process(tmp_path):
    """Hydra -m: each job gets its own run dir and megatron state (torn down between jobs)."""
    env = dict(os.environ, WORLD_SIZE="1")
    out = subprocess.run([sys.executable, "-m", "twotower.training.train", "-m", "experiment=smoke_cpu",
                          "optim.lr=1e-3,3e-3", "trainer.max_steps=2", "trainer.log_interval=1",
                          "optim.warmup_steps=0", "checkpoint.interval=0", f"hydra.sweep.dir={tmp_path}/sweep",
                          f"trainer.run_dir={tmp_path}/lr" + "${optim.lr}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for lr in (0.001, 0.003):
        rows = [json.loads(x) for x in (tmp_path / f"lr{lr}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
        assert rows[0]["lr"] == pytest.approx(lr)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this host may have Transformer Engine")
def test_transformer_engine_is_refused_on_this_host_but_not_where_a_job_is_submitted(compose_config):
    cfg = compose_config("experiment=smoke_cpu", "parallel.transformer_impl=transformer_engine")
    cfg.validate(1, check_host=False)  # twotower-launch on a login node: the nodes decide
    with pytest.raises(ConfigError, match=r"parallel\.transformer_impl='transformer_engine' needs CUDA and "
                                          r"transformer_engine; installed here: CUDA no"):
        cfg.validate(1)
