"""Recovery from faults injected for real: damaged checkpoints (truncated / corrupted files), a
changed configuration on resume, diverging losses, ``resume=none`` over older checkpoints, a second
process on the same run, a read-only and a full checkpoint directory.

The oracle, where there is one, is an uninterrupted run: after recovering, the loss curve and
the final weights equal it bit for bit, and nothing that existed before was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from twotower.training.checkpoint import CheckpointError, CorruptCheckpointError

REPO = Path(__file__).resolve().parents[2]
TINY = ["experiment=smoke_cpu", "logging=none", "parallel.attention_backend=sdpa", "parallel.ssm_backend=torch",
        "trainer.seq_len=32", "twotower.block_size=8", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.eval_batches=1", "checkpoint.resume=auto",
        "optim.distributed_optimizer=true", "optim.warmup_steps=1"]


def _cfg(run: Path, steps: int, *extra: str) -> list[str]:
    return [*TINY, f"trainer.run_dir={run}", f"trainer.max_steps={steps}", *extra]


@contextmanager
def trainer(compose_config, overrides):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    tr = None
    try:
        tr = Trainer(compose_config(*overrides))
        yield tr
    finally:
        if tr is not None:
            tr.close()
        destroy_parallel()  # also when the Trainer refused to start


def _train(compose_config, overrides, after_step=None) -> tuple[int, dict]:
    """Train one launch; ``after_step(tr)`` runs after every step (fault injection). Returns the
    step it started at and the final denoiser weights."""
    with trainer(compose_config, overrides) as tr:
        start = tr.step
        if after_step is not None:
            step_fn = tr.train_step

            def train_step():
                out = step_fn()
                after_step(tr)
                return out
            tr.train_step = train_step
        tr.train()
        return start, {k: v.clone() for k, v in tr.model.denoiser_tower.state_dict().items() if torch.is_tensor(v)}


def _rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _rows(run) if "loss" in r]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_byte(path: Path) -> None:  # same size, different content: only the checksum sees it
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 2 steps with a checkpoint after each (step_1, step_2), copied by each test."""
    from train_helpers import compose

    run = tmp_path_factory.mktemp("recovery") / "run"
    _train(compose, _cfg(run, 2, "checkpoint.interval=1"))
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


# ------------------------------------------------------------------------------------ 1. damaged checkpoints
@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_bit_exactly(compose_config, tmp_path, capsys):
    _, w_full = _train(compose_config, _cfg(tmp_path / "full", 4, "checkpoint.interval=2"))
    run = tmp_path / "cut"
    _train(compose_config, _cfg(run, 4, "checkpoint.interval=2"))  # saves step 2 and 4, then "crashes"
    newest = run / "checkpoints" / "step_00000004"
    _truncate(newest / "__0_0.distcp")
    capsys.readouterr()

    start, w_res = _train(compose_config, _cfg(run, 4, "checkpoint.interval=2"))
    out = capsys.readouterr().out
    assert start == 2  # the previous complete checkpoint
    assert f"checkpoint {newest} is damaged: __0_0.distcp" in out and "truncated" in out
    broken = newest.with_name("step_00000004.broken")
    assert f"moved it aside to {broken}" in out and (broken / "__0_0.distcp").exists()  # kept, not deleted
    assert _losses(run) == _losses(tmp_path / "full")  # one curve, no contradicting duplicate steps
    assert [r["step"] for r in _rows(run, "metrics.superseded.jsonl") if "loss" in r] == [3, 4]  # 1st launch's
    assert _same(w_full, w_res)

    # the same damaged folder named explicitly: refused, naming the file (twotower-train: exit 5)
    explicit = _cfg(run, 4, f"checkpoint.resume={broken}")
    with pytest.raises(CorruptCheckpointError, match=r"step_00000004.broken is damaged: __0_0.distcp: .*truncated"), \
            trainer(compose_config, explicit):
        pass


@pytest.mark.parametrize("name,damage", [
    (".metadata", _truncate), ("__0_1.distcp", _truncate), ("common.pt", _truncate), ("extra.json", _truncate),
    ("scheduler.pt", _truncate), ("rng/rank_00000.pt", _truncate), ("manifest.json", _truncate),
    ("__0_0.distcp", _flip_byte),
], ids=["metadata", "shard", "common", "extra", "scheduler", "rng", "manifest", "shard-bitflip"])
def test_each_damaged_file_is_named_and_the_previous_checkpoint_resumed(compose_config, two_checkpoints, tmp_path,
                                                                        capsys, name, damage):
    run = _copy(two_checkpoints, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000002"
    damage(newest / name)
    copy = _copy(newest, tmp_path / "step_00000002")  # for the explicit resume below
    capsys.readouterr()
    with trainer(compose_config, _cfg(run, 2)) as tr:
        assert tr.step == 1
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged: {name}:" in out
    assert (run / "checkpoints" / "step_00000002.broken" / name).exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002.broken"]
    with pytest.raises(CorruptCheckpointError, match=f"{copy} is damaged: {name}:"), \
            trainer(compose_config, _cfg(run, 2, f"checkpoint.resume={copy}")):
        pass


# ------------------------------------------------------------------------------------ 2. config changes on resume
def test_resume_refuses_another_diffusion_geometry_by_name(compose_config, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "run")
    for change, msg in (("twotower.block_size=4", "twotower.block_size: checkpoint 8, this run 4"),
                        ("twotower.mask_token_id=5", "twotower.mask_token_id: checkpoint 3, this run 5"),
                        ("twotower.adaln_init=release", "twotower.adaln_init: checkpoint 'identity', this run 'release'")):
        with pytest.raises(CheckpointError, match=msg), trainer(compose_config, _cfg(run, 4, change)):
            pass
    assert (run / "checkpoints" / "step_00000002").is_dir()  # a refusal moves nothing


def test_changed_lr_schedule_applies_from_the_saved_step(compose_config, two_checkpoints, tmp_path, capsys):
    from types import SimpleNamespace

    from twotower.training.optim import build_scheduler

    run = _copy(two_checkpoints, tmp_path / "run")
    new = ["optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=3", "optim.schedule=wsd"]
    cfg = compose_config(*_cfg(run, 5, *new))
    group = {"max_lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr, "wd_mult": 1.0}
    expected = build_scheduler(cfg.optim, SimpleNamespace(param_groups=[group]), cfg.trainer.max_steps)
    lrs = []
    expected.step(2)
    for _ in range(3):  # steps 3, 4, 5 train with the schedule's LR after 2, 3, 4 steps
        lrs.append(expected.get_lr(group))
        expected.step(1)
    capsys.readouterr()
    with trainer(compose_config, _cfg(run, 5, *new)) as tr:
        assert tr.step == 2
        assert {g["max_lr"] for g in tr.optimizer.param_groups} == {1e-4}
        tr.train()
    assert "optim.lr 0.001 -> 0.0001" in capsys.readouterr().out
    assert [(r["step"], r["lr"]) for r in _rows(run) if r["step"] > 2 and "lr" in r] == list(zip((3, 4, 5), lrs))


# ------------------------------------------------------------------------------------ 3. non-finite losses
@pytest.mark.slow
def test_no_checkpoint_is_written_while_losses_are_non_finite(compose_config, tmp_path):
    from twotower.training.trainer import TrainingStopped

    def diverge_after_3(tr):  # the weights blow up during step 3: steps 4, 5, ... are non-finite
        if tr.step == 3:
            with torch.no_grad():
                tr.model.denoiser_tower.output_layer.weight.fill_(float("inf"))

    run = tmp_path / "stop"
    with pytest.raises(TrainingStopped, match=r"3 non-finite losses in a row, steps 4-6 .*resumes from "
                                              r".*step_00000002"):
        _train(compose_config, _cfg(run, 8, "checkpoint.interval=2", "trainer.max_consecutive_nonfinite=3"),
               after_step=diverge_after_3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # not 4, not 6
    # the relaunch the message advises (a lower LR) resumes from before the streak and trains
    with trainer(compose_config, _cfg(run, 8, "optim.lr=1e-4", "checkpoint.interval=0")) as tr:
        assert tr.step == 2
        assert all(torch.isfinite(p).all() for p in tr.model.denoiser_tower.parameters())
        assert tr.train_step()["loss"] < float("inf")

    # the streak reaches trainer.max_steps: no interval save at 4, no final save at 5
    run = tmp_path / "end"
    _train(compose_config, _cfg(run, 5, "checkpoint.interval=2", "trainer.max_consecutive_nonfinite=5"),
           after_step=diverge_after_3)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]


# ------------------------------------------------------------------------------------ 4. resume=none
def test_resume_none_sets_older_checkpoints_aside_and_keeps_its_own(compose_config, two_checkpoints, tmp_path,
                                                                    capsys):
    from twotower.training.checkpoint import CheckpointConfig, Checkpointer

    run = _copy(two_checkpoints, tmp_path / "run")
    ckpts = run / "checkpoints"
    capsys.readouterr()
    _train(compose_config, _cfg(run, 1, "checkpoint.resume=none", "checkpoint.interval=1", "checkpoint.keep_last=1",
                                "trainer.seed=7"))
    out = capsys.readouterr().out
    aside = [p for p in ckpts.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_00000001", "step_00000002"]
    assert f"were moved to {aside[0]}" in out
    assert f"saved checkpoint {ckpts / 'step_00000001'}" in out
    latest = Checkpointer(CheckpointConfig(dir=str(ckpts))).latest()
    assert latest == ckpts / "step_00000001"  # the new run's, not pruned, and what auto resumes
    assert json.loads((latest / "extra.json").read_text())["extra"]["config"]["trainer"]["seed"] == 7
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1]  # the old run's rows moved aside
    assert [r["step"] for r in _rows(run, "metrics.superseded.jsonl") if "loss" in r] == [1, 2]


# ------------------------------------------------------------------------------------ 5. one process per run
def _env() -> dict:
    """This process's environment without the 1-process world the in-process Trainer set up."""
    dist = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in dist}, "PYTHONWARNINGS": "ignore"}


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env())


def test_a_second_process_on_the_same_run_is_refused(compose_config, tmp_path):
    from twotower.training.run_lock import RunLockedError

    run = tmp_path / "run"
    holder = _python("import time; from twotower.training.run_lock import RunLock\n"
                     f"lock = RunLock({str(run)!r}, {str(run / 'checkpoints')!r})\n"
                     "lock.acquire(); print('locked', flush=True); time.sleep(120)")
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = f"host {socket.gethostname()}, pid {holder.pid}"
        with pytest.raises(RunLockedError, match=f"{run} is in use by another training process \\({who}"), \
                trainer(compose_config, _cfg(run, 2)):
            pass
        # another run directory, but the same checkpoint directory: refused too
        other = _cfg(tmp_path / "other", 2, f"checkpoint.dir={run / 'checkpoints'}")
        with pytest.raises(RunLockedError, match=f"{run / 'checkpoints'} is in use .*{who}"), \
                trainer(compose_config, other):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the lock file stays, the lock does not
        holder.wait()
    assert (run / ".twotower.lock").exists()
    with trainer(compose_config, _cfg(run, 2, "checkpoint.interval=1")) as tr:  # a stale lock does not block
        tr.train()
        cli = subprocess.run([sys.executable, "-m", "twotower.training.train", *_cfg(run, 4)], check=False, cwd=REPO,
                             capture_output=True, text=True, env=_env(), timeout=300)
        assert cli.returncode == 5, cli.stdout + cli.stderr
        assert f"is in use by another training process (host {socket.gethostname()}, pid {os.getpid()}" in cli.stderr
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2]  # nothing from the refused process


# ------------------------------------------------------------------------------------ 6. read-only, full
def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], check=False, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@contextmanager
def read_only(path: Path):
    """``path`` read-only for this process: permission bits, or (root ignores them) a read-only bind mount."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if not _mount("--bind", str(path), str(path)):
        pytest.skip("root, and cannot bind-mount: no way to make a directory read-only here")
    try:
        if not _mount("-o", "remount,bind,ro", str(path)):
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_checkpoint_directory_is_refused_before_training(compose_config, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "run")
    ckpts = run / "checkpoints"
    with read_only(ckpts), \
            pytest.raises(CheckpointError, match=f"{ckpts} is not writable \\((Read-only file system|Permission)"), \
            trainer(compose_config, _cfg(run, 4)):
        pass
    assert _losses(run) == _losses(two_checkpoints)  # nothing trained, nothing logged
    with trainer(compose_config, _cfg(run, 4)) as tr:  # writable again: the checkpoint is intact
        assert tr.step == 2


def test_checkpoint_directory_turning_read_only_is_named_at_save(compose_config, tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    later = ExitStack()

    def lock_down_after_step_2(tr):  # before step 2 is saved: step 1 is
        if tr.step == 2:
            later.enter_context(read_only(ckpts))

    try:
        with pytest.raises(CheckpointError, match=f"could not save checkpoint step 2 in {ckpts}: the directory is not "
                                                  "writable .*step_00000001 is intact"):
            _train(compose_config, _cfg(run, 3, "checkpoint.interval=1"), after_step=lock_down_after_step_2)
    finally:
        later.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]
    with trainer(compose_config, _cfg(run, 3)) as tr:
        assert tr.step == 1


@pytest.mark.slow
def test_full_disk_at_save_is_named_and_the_previous_checkpoint_kept(compose_config, two_checkpoints, tmp_path):
    one = sum(p.stat().st_size for p in (two_checkpoints / "checkpoints" / "step_00000002").rglob("*"))
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={int(one * 1.5)}", "tmpfs", str(disk)):
        pytest.skip("cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        ckpts = disk / "checkpoints"
        run = tmp_path / "run"
        with pytest.raises(CheckpointError, match=f"could not save checkpoint step 2 in {ckpts}: no space left on "
                                                  "device .*step_00000002.tmp was removed .*step_00000001 is intact"):
            _train(compose_config, _cfg(run, 4, "checkpoint.interval=1", f"checkpoint.dir={ckpts}"))
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]
        with trainer(compose_config, _cfg(run, 4, f"checkpoint.dir={ckpts}")) as tr:
            assert tr.step == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------------------------ two ranks
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_cover_their_files_and_agree_on_a_fallback(torchrun, tmp_path):
    """DP=2, distributed optimizer: the manifest lists every rank's shards and RNG file; a damaged
    file only rank 1 reads (its RNG state) makes both ranks fall back together."""
    from twotower.training.train import __file__ as train_py

    run = tmp_path / "run"
    torchrun(train_py, nproc=2, args=_cfg(run, 2, "checkpoint.interval=1"))
    newest = run / "checkpoints" / "step_00000002"
    files = json.loads((newest / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json", "COMPLETE"}  # every rank's files, e.g. both RNG files
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", ".metadata", "common.pt", "scheduler.pt"} <= set(files)
    _truncate(newest / "rng" / "rank_00001.pt")
    out = torchrun(train_py, nproc=2, args=_cfg(run, 3, "checkpoint.interval=1")).stdout
    assert f"checkpoint {newest} is damaged: rng/rank_00001.pt" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'}" in out
    assert [r["step"] for r in _rows(run) if "loss" in r] == [1, 2, 3]
