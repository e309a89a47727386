"""Preempt-and-resume through the Trainer: an uninterrupted run is the oracle.

Real webdataset shards (the loader's resume state is part of the checkpoint), a TwoTower
run with the distributed optimizer, stopped after K steps and resumed with
``checkpoint.resume=auto`` in a fresh Trainer: the remaining losses, the final denoiser
weights and the data position equal the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

N, K = 6, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from twotower.data.synthetic import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("resume_corpus") / "data", seq_len=32, n_docs=120)


def _overrides(corpus: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["logging=none", f"data.train.0.path={corpus}", f"data.valid_path={corpus}",
            "data.seq_len=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer.synthetic_data=false",
            "trainer.seq_len=32", "twotower.block_size=8", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2", f"trainer.max_steps={steps}", f"trainer.run_dir={run}",
            f"checkpoint.dir={run}/ckpt", f"checkpoint.interval={K}", "checkpoint.resume=auto",
            "trainer.log_interval=1", "trainer.eval_interval=0", "parallel.attention_backend=sdpa",
            "parallel.ssm_backend=torch", "optim.distributed_optimizer=true", *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _run(compose_config, overrides, signal_after: int = 0):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    tr = None
    try:
        tr = Trainer(compose_config(*overrides))
        start = tr.step
        if signal_after:  # the scheduler's preemption notice arrives during step `signal_after`
            step_fn = tr.train_step

            def train_step():
                out = step_fn()
                if tr.step == signal_after:
                    signal.raise_signal(signal.SIGTERM)
                return out
            tr.train_step = train_step
        tr.train()  # saves every checkpoint.interval steps and at the end
        weights = {k: v.clone() for k, v in tr.model.denoiser_tower.state_dict().items() if torch.is_tensor(v)}
        next_batch = tr._tokens(0).clone()
        return start, weights, next_batch, tr.consumed_tokens
    finally:
        if tr is not None:
            tr.close()
        destroy_parallel()  # also when the Trainer refused to start


@pytest.mark.slow
def test_preempted_run_resumes_bit_identically(compose_config, corpus, tmp_path):
    _, w_full, next_full, tokens_full = _run(compose_config, _overrides(corpus, tmp_path / "full", N))

    # the first launch is cut short although its LR schedule is for N steps
    _run(compose_config, _overrides(corpus, tmp_path / "cut", N, f"trainer.exit_after_steps={K}"))
    start, w_res, next_res, tokens_res = _run(compose_config, _overrides(corpus, tmp_path / "cut", N))

    assert start == K  # resumed from the step-K checkpoint, not from scratch
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, N + 1))
    assert _losses(tmp_path / "cut") == full  # one metrics.jsonl, appended, the same curve
    assert tokens_res == tokens_full == N * 4 * 32
    assert next_res.equal(next_full)  # the data stream continues where it stopped
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_run_resumes(compose_config, corpus, tmp_path):
    _, w_full, _, _ = _run(compose_config, _overrides(corpus, tmp_path / "full", N, "checkpoint.interval=100"))
    run = tmp_path / "sig"
    _run(compose_config, _overrides(corpus, run, N, "checkpoint.interval=100"), signal_after=2)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_00000002"]  # saved off-interval
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after train()
    start, w_res, _, _ = _run(compose_config, _overrides(corpus, run, N, "checkpoint.interval=100"))
    assert start == 2
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert _losses(run) == _losses(tmp_path / "full")


def test_resume_refuses_a_checkpoint_of_another_model(compose_config, corpus, tmp_path):
    from twotower.training.checkpoint import CheckpointError

    _run(compose_config, _overrides(corpus, tmp_path / "a", K))
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 96, this run 64"):
        _run(compose_config, _overrides(corpus, tmp_path / "a", N, "model.hidden_size=64",
                                        "model.head_dim=16", "model.mamba_head_dim=16"))


@pytest.mark.slow
def test_next_phase_starts_from_the_previous_phases_weights_only(compose_config, corpus, tmp_path):
    """checkpoint.init_from (how the paper's phases chain): the final weights of phase 1, a fresh
    optimizer and LR schedule at step 0, and a different block size (32 -> 16 in the paper)."""
    _, w_phase1, _, _ = _run(compose_config, _overrides(corpus, tmp_path / "p1", K))
    init = tmp_path / "p1" / "ckpt" / f"step_{K:08d}"
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    tr = Trainer(compose_config(*_overrides(corpus, tmp_path / "p2", N, f"checkpoint.init_from={init}",
                                            "twotower.block_size=4", "optim.warmup_steps=2")))
    try:
        assert tr.step == 0 and tr.consumed_tokens == 0
        now = tr.model.denoiser_tower.state_dict()
        assert all(torch.equal(w_phase1[k], now[k]) for k in w_phase1)
        assert tr.scheduler.get_lr(tr.optimizer.param_groups[0]) < 3e-3 / 2  # warming up again
        row = tr.train_step()
        assert tr.step == 1 and row["loss"] == row["loss"]  # trains (finite)
    finally:
        tr.close()
        destroy_parallel()
