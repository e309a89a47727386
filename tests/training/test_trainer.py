"""Single-process training: it learns, the context tower stays frozen, metrics are written."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


@contextmanager
def trainer_for(compose_config, *overrides):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    trainer = Trainer(compose_config(*overrides))
    try:
        yield trainer
    finally:
        trainer.close()
        destroy_parallel()


SMALL = ["experiment=smoke_cpu", "parallel.attention_backend=sdpa", "parallel.ssm_backend=torch",
         "trainer.seq_len=32", "twotower.block_size=8", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
         "checkpoint.interval=0", "optim.warmup_steps=5", "optim.lr=3e-3", "optim.min_lr=3e-4"]


@pytest.mark.slow
@pytest.mark.parametrize("objective,steps,extra", [("ar", 40, []), ("diffusion", 60, []),
                                                   ("diffusion", 60, ["diffusion=release"])],
                         ids=["ar", "diffusion", "diffusion-release"])
def test_tiny_run_learns(compose_config, tmp_path, objective, steps, extra):
    with trainer_for(compose_config, *SMALL, *extra, f"objective={objective}", f"trainer.max_steps={steps}",
                     f"trainer.run_dir={tmp_path}", "trainer.log_interval=10",
                     "trainer.peak_flops_per_device=1e12") as tr:
        tr.train()
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    first, last = losses[0], sum(losses[-2:]) / 2
    assert last < 0.6 * first, losses  # the synthetic sequences are learnable from 2 tokens of context
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops_per_device", "mfu"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["tokens"] == steps * 8 * 32
    assert 0 < train_rows[-1]["mfu"] < 1
    assert any("val/ar_nll" in r for r in rows)  # the end-of-run validation ran


def test_context_tower_frozen_and_optimizer_holds_only_denoiser(compose_config, tmp_path):
    with trainer_for(compose_config, *SMALL, "trainer.max_steps=3", f"trainer.run_dir={tmp_path}",
                     "optim.distributed_optimizer=false") as tr:
        before = {k: v.clone() for k, v in tr.model.context_tower.state_dict().items() if torch.is_tensor(v)}
        den_before = {k: v.clone() for k, v in tr.model.denoiser_tower.state_dict().items() if torch.is_tensor(v)}
        tr.train()
        after = tr.model.context_tower.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "context tower changed"
        changed = [k for k, v in tr.model.denoiser_tower.state_dict().items()
                   if torch.is_tensor(v) and k in den_before and not torch.equal(v, den_before[k])]
        assert changed, "denoiser did not train"
        ctx_params = {id(p) for p in tr.model.context_tower.parameters()}
        opt_params = [p for opt in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer])
                      for g in opt.optimizer.param_groups for p in g["params"]]
        model_params = [p for opt in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer])
                        for g in opt.param_groups for p in g["params"]]
        assert opt_params and not ctx_params & {id(p) for p in model_params}
        n_trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
        assert sum(p.numel() for p in model_params) == n_trainable
        assert not any(id(p) in ctx_params for p in tr.ddp.params_with_grad)


def test_nonfinite_losses_skip_steps_then_stop(compose_config, tmp_path):
    from twotower.training.trainer import TrainingStopped

    with trainer_for(compose_config, *SMALL, "trainer.max_steps=10", f"trainer.run_dir={tmp_path}",
                     "trainer.max_consecutive_nonfinite=2") as tr:
        with torch.no_grad():
            tr.model.denoiser_tower.output_layer.weight.fill_(float("nan"))
        w = {k: v.clone() for k, v in tr.model.denoiser_tower.state_dict().items() if torch.is_tensor(v)}
        out = tr.train_step()
        assert out["skipped_steps"] == 1 and out["loss"] != out["loss"]
        unchanged = tr.model.denoiser_tower.state_dict()
        assert all(torch.equal(w[k], unchanged[k], ) or torch.isnan(w[k]).any() for k in w)
        with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
            tr.train_step()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_closed_trainer_is_freed(compose_config, tmp_path):
    """A Hydra --multirun sweep runs trainer after trainer in one process: after close() and
    destroy_parallel() nothing of a run stays alive (its DDP-wrapped model, so its tensors and the
    process groups its buffers hold), and the open files do not grow from run to run."""
    import gc
    import os
    import weakref

    def one(run):
        with trainer_for(compose_config, *SMALL, "trainer.max_steps=2", "checkpoint.interval=2",
                         f"trainer.run_dir={run}") as tr:
            tr.train()
            return weakref.ref(tr.ddp), weakref.ref(tr.optimizer)

    refs = one(tmp_path / "a")
    gc.collect()
    assert all(r() is None for r in refs)
    fds = len(os.listdir("/proc/self/fd"))
    refs = one(tmp_path / "b")
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
