"""Fault audit through the real CLIs: each fault injected for real (a process-group SIGTERM with a
data-loader worker, a SIGKILL, bad overrides, damaged datasets and backbone folders, meaningless
decoding arguments); each test checks the exit code, that the message names the culprit, and that
nothing was lost.

Signals run ``python -m twotower.training.train`` as a fresh process in its own session (what
``srun`` / ``sbatch`` start). The other ``twotower-train`` cases run its ``main()`` in processes
forked from one "zygote" that imported twotower once (``python tests/training/test_cli_faults.py
--zygote``): the same entry point, argv, exit status and streams as the console script, without
paying ~6 s of imports (megatron) per case.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "data"))
ENV = {"WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
       "WANDB_MODE": "offline"}


# ------------------------------------------------------------------------------------------- harness
@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def _zygote() -> None:
    """Serve ``{"argv", "out", "err"}`` lines on stdin: fork, run twotower-train's main(), report."""
    import atexit
    import traceback

    from twotower.training import train

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, path in ((1, req["out"]), (2, req["err"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = ["twotower-train", *req["argv"]]
                try:
                    exec(req["code"], {}) if req.get("code") else train.main()  # noqa: S102 (the tests' own code)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except Exception:  # noqa: BLE001 (what the interpreter does with an uncaught one)
                    traceback.print_exc()
                atexit._run_exitfuncs()  # what interpreter exit runs (multiprocessing's cleanup, ...)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], cwd=REPO, env={**os.environ, **ENV},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        assert json.loads(self._line(120)) == {"ready": True}

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail(f"twotower-train did not finish within {timeout} s")
        return self.proc.stdout.readline()

    def run(self, *argv: str, timeout: float = 180, code: str | None = None) -> Result:
        """``twotower-train *argv`` (or python ``code``) in a fresh child of the zygote."""
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        req = {"argv": list(argv), "code": code, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._line(timeout))["rc"]
        return Result(rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the zygote's own session: only what it started
            self.proc.wait()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from twotower.data.synthetic import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("cli_corpus") / "data", seq_len=32, n_docs=120)


def _train_args(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """A small real training run on ``data`` with one data-loader worker; ``extra`` replaces keys."""
    base = ["logging=none", f"data.train.0.path={data}", f"data.valid_path={data}", "data.seq_len=32",
            "data.num_workers=1", "data.shuffle_buffer=16", "trainer.seq_len=32", "twotower.block_size=8",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=2", f"trainer.max_steps={steps}",
            f"trainer.run_dir={run}", f"checkpoint.dir={run}/ckpt", "checkpoint.interval=2",
            "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.eval_batches=2",
            "parallel.attention_backend=sdpa", "parallel.ssm_backend=torch", "optim.warmup_steps=1"]
    keys = {e.split("=")[0] for e in extra}
    return [b for b in base if b.split("=")[0] not in keys] + list(extra)


class Trainer:
    """``python -m twotower.training.train`` in a new session (its own process group), its merged
    output collected line by line by a thread."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "twotower.training.train", *args], cwd=REPO,
                                     env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break  # the trainer exited
            self.seen.append(line)
            if re.search(pattern, line):
                return
        self.kill_all()
        pytest.fail(f"no line matching {pattern!r}:\n" + "".join(self.seen)[-4000:])

    def finish(self, timeout: float = 180) -> str:
        """Wait for the exit; all output."""
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        with contextlib.suppress(queue.Empty):
            while (line := self.lines.get_nowait()) is not None:
                self.seen.append(line)
        return "".join(self.seen)

    def kill_all(self) -> None:
        for p in [*_group(self.proc.pid), *([self.proc] if self.proc.poll() is None else [])]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill()  # only this test's own session


def _group(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _complete(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if (p / "COMPLETE").exists())


def _unchanged(before: dict[str, bytes], root: Path) -> bool:
    """Every file that was under ``root`` is still there, byte for byte (new files may appear)."""
    from data_helpers import file_digests

    now = file_digests(root)
    return all(now.get(k) == v for k, v in before.items())


# ------------------------------------------------------------------------------------------- item 7
def test_process_group_sigterm_with_a_worker_stops_with_a_checkpoint_and_resumes(cli, corpus, tmp_path):
    """scancel / a SLURM time limit: SIGTERM to the whole process group, data-loader worker included."""
    run = tmp_path / "run"
    tr = Trainer(_train_args(corpus, run, 50))
    try:
        tr.wait_for(r"^step 3/50")  # a checkpoint (step 2) exists: its writer's helper too
        assert any(c.name() == "pt_data_worker" for c in psutil.Process(tr.proc.pid).children(recursive=True))
        os.killpg(tr.proc.pid, signal.SIGTERM)
        out = tr.finish()
    finally:
        tr.kill_all()
    assert tr.proc.returncode == 6, out[-4000:]
    stop = int(re.search(r"stopping at step (\d+)/50 \(signal SIGTERM\)", out).group(1))
    assert "killed by signal" not in out and "Traceback" not in out
    assert _complete(run / "ckpt")[-1] == f"step_{stop:08d}"  # the newest checkpoint is the stop step
    assert json.loads((run / "ckpt" / f"step_{stop:08d}" / "extra.json").read_text())["step"] == stop
    assert not list((run / "ckpt").glob("*.tmp"))

    again = cli.run(*_train_args(corpus, run, stop + 2))
    assert again.rc == 0, again.text[-4000:]
    assert f"resumed at step {stop}" in again.text
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, stop + 3))  # nothing lost, nothing repeated


# ------------------------------------------------------------------------------------------- item 9
def test_sigkill_of_the_trainer_leaves_no_orphans(cli, corpus, tmp_path):
    """The OOM killer or the scheduler's final SIGKILL hits the trainer only: its data-loader worker
    and the checkpoint writer's result-queue server must not outlive it."""
    tr = Trainer(_train_args(corpus, tmp_path / "run", 50))
    try:
        tr.wait_for(r"^step 3/50")
        helpers = psutil.Process(tr.proc.pid).children(recursive=True)
        assert len(helpers) >= 2 and any(c.name() == "pt_data_worker" for c in helpers), helpers
        tr.proc.kill()
        tr.finish(timeout=30)
        deadline, left = time.monotonic() + 5, _group(tr.proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _group(tr.proc.pid)
        assert not left, f"orphans of the killed trainer: {[(p.pid, p.name()) for p in left]}"
    finally:
        tr.kill_all()

    # what megatron's torch_dist writer does during a save: fork helpers (fork context), here in a
    # process that installed twotower-train's child policy and is then SIGKILLed
    r = cli.run(code=textwrap.dedent("""
        import multiprocessing as mp, os, signal, time
        from twotower.training.preemption import install_child_policy
        install_child_policy()
        p = mp.get_context("fork").Process(target=time.sleep, args=(60,))
        p.start()
        print(p.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    assert r.rc == -signal.SIGKILL, r.text
    child = int(r.out.split()[0])
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("a forked helper outlived the SIGKILLed trainer")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ item 10
CONFIG_CASES = [
    (["+trainer.foo=1"], "unknown key trainer.foo"),
    (["+optim.lr_typo=5"], "unknown key optim.lr_typo"),
    (["trainer.max_stepz=3"], "unknown key trainer.max_stepz"),
    (["trainer.max_steps=abc"], ("override 'trainer.max_steps=abc': trainer.max_steps: Value 'abc' of type "
                                 "'str' could not be converted to Integer")),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    (["optim.clip_grad=-1"], "optim.clip_grad=-1.0 must be >= 0"),
    (["checkpoint.interval=-2"], "checkpoint.interval=-2 must be >= 0"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1 must be >= 0"),
    (["data.train.0.path=/somewhere"], "override 'data.train.0.path=/somewhere': data is null in this configuration"),
]


def test_configuration_errors_exit_2_naming_the_key_before_anything_starts(cli, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)  # an earlier run's state
    (run / "checkpoints" / "step_00000002" / "COMPLETE").write_text("2\n")
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    from data_helpers import file_digests

    before = file_digests(run)
    for extra, msg in CONFIG_CASES:
        r = cli.run("experiment=smoke_cpu", f"trainer.run_dir={run}", *extra)
        assert r.rc == 2, (extra, r.text[-3000:])
        assert f"twotower-train: configuration error: {msg}" in r.err, (extra, r.err[-3000:])
        assert "Traceback" not in r.text and "[twotower]" not in r.out  # no trainer, no process group
    assert _unchanged(before, run)

    # an unknown experiment through a pristine interpreter: Hydra's own composition error
    real = subprocess.run([sys.executable, "-m", "twotower.training.train", "experiment=nope",
                           f"trainer.run_dir={run}"], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert real.returncode == 2, real.stderr[-3000:]
    assert "configuration error: In 'config': Could not find 'experiment/nope'" in real.stderr
    assert "smoke_cpu" in real.stderr and "Traceback" not in real.stderr  # the options are listed
    assert _unchanged(before, run)


# ------------------------------------------------------------------------------------------ item 11
def test_bad_datasets_exit_5_naming_the_file(cli, corpus, tmp_path):
    import numpy as np
    from data_helpers import file_digests, npy_bytes, write_raw_dataset

    def bad(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(corpus, d, ignore=shutil.ignore_patterns("raw"))
        damage(d)
        return d

    empty = tmp_path / "empty"
    empty.mkdir()
    notjson = bad("notjson", lambda d: (d / "manifest.json").write_text("{oops"))
    ghost = bad("ghost", lambda d: (d / "train-000003.tar").unlink())
    cases = [  # found before the trainer starts: read_manifest / the dataset's plan
        (empty, [], f"DatasetNotFoundError: {empty / 'manifest.json'}: no manifest"),
        (notjson, [], f"DatasetError: {notjson / 'manifest.json'}: not valid JSON (line 1"),
        (ghost, [], f"{ghost / 'manifest.json'}: split 'train' lists shard train-000003.tar which is missing"),
        (corpus, ["data.seq_len=64", "trainer.seq_len=64"],
         f"seq_len 32 in manifest.json != DataConfig.seq_len 64 ({corpus / 'manifest.json'})"),
    ]
    # found by a worker while training: a truncated offset index; an id past the vocabulary in a
    # dataset whose manifest records none (data.vocab_size unset: the model's vocabulary applies)
    trunc = bad("trunc", lambda d: [p.write_bytes(p.read_bytes()[:64]) for p in d.glob("train-*.idx.npz")])
    rows = [{"__key__": f"s{i:03d}", "tokens.npy": npy_bytes(np.full(32, 300 if i == 5 else 40, np.uint32)),
             "json": b'{"length": 32}'} for i in range(64)]
    novocab = write_raw_dataset(tmp_path / "novocab", rows, seq_len=32, vocab_size=None)
    t = re.escape(str(trunc))
    cases += [(trunc, [], re.compile(rf"BadSampleError: shard {t}/train-\d+\.tar: unreadable index {t}/train-\d+\.idx")),
              (novocab, ["data.vocab_size=null", f"data.valid_path={corpus}", "data.shuffle_buffer=1"],
               f"shard {novocab / 'train-000000.tar'} key 's005': token id 300 outside the model vocab [0, 260)")]
    for data, extra, msg in cases:
        before = file_digests(data)
        run = tmp_path / f"run-{data.name}"
        r = cli.run(*_train_args(data, run, 20, *extra))
        assert r.rc == 5, (data.name, r.text[-3000:])
        found = msg.search(r.err) if isinstance(msg, re.Pattern) else msg in r.err
        assert found, (data.name, r.err[-3000:])
        assert "Traceback" not in r.err and file_digests(data) == before  # the dataset is left as it was
        assert not (run / "ckpt").exists() or not _complete(run / "ckpt")  # no checkpoint of bad data

    # the dataset directory moved after a checkpoint: refused by default, resumed with the override
    orig = tmp_path / "orig"
    shutil.copytree(corpus, orig, ignore=shutil.ignore_patterns("raw"))
    run = tmp_path / "run-moved"
    first = cli.run(*_train_args(orig, run, 6, "trainer.exit_after_steps=2"))
    assert first.rc == 6, first.text[-3000:]
    moved = orig.rename(tmp_path / "moved")
    kept = file_digests(run / "ckpt")
    r = cli.run(*_train_args(moved, run, 6))
    assert r.rc == 5, r.text[-3000:]
    assert f"({orig} -> {moved}) with the same contents, set data.on_path_change=by_position" in r.err
    assert _unchanged(kept, run / "ckpt") and _complete(run / "ckpt") == ["step_00000002"]
    r = cli.run(*_train_args(moved, run, 4, "data.on_path_change=by_position"))
    assert r.rc == 0 and "resumed at step 2" in r.text, r.text[-3000:]


# ------------------------------------------------------------------------------------------ item 12
def _backbone(root: Path, name: str, hf: dict, tensors: bool = True) -> Path:
    import torch
    from safetensors.torch import save_file

    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    if tensors:
        save_file({"backbone.embeddings.weight": torch.zeros(260, 96)}, str(d / "model.safetensors"))
    return d


def test_bad_backbones_exit_5_naming_the_folder_and_file(cli, compose_config, tmp_path):
    from data_helpers import file_digests

    from twotower.model.hf_import import CheckpointKeyError, HFWeights

    hf = compose_config("experiment=smoke_cpu").model.to_hf_dict()
    other = _backbone(tmp_path, "other", {**hf, "hidden_size": 64})
    none = _backbone(tmp_path, "none", hf, tensors=False)
    trunc = _backbone(tmp_path, "trunc", hf)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:1000])
    llama = _backbone(tmp_path, "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    cases = [(other, f"{other}: the checkpoint's config (config.json) differs from the model's"),
             (other, "hidden_size: model 96 vs checkpoint 64"),
             (none, f"{none}: no model.safetensors or model.safetensors.index.json"),
             (trunc, f"{trunc}: model.safetensors is not a readable safetensors file (truncated or damaged?"),
             (llama, f"{llama}: model_type='llama', architectures=['LlamaForCausalLM']; expected a NemotronH")]
    for folder, msg in cases:
        before = file_digests(folder)
        r = cli.run("experiment=smoke_cpu", f"backbone={folder}", f"trainer.run_dir={tmp_path / 'run'}")
        assert r.rc == 5, (folder.name, r.text[-3000:])
        assert "CheckpointKeyError: " in r.err and msg in r.err, (folder.name, r.err[-3000:])
        assert "Traceback" not in r.err and "[twotower]" not in r.out and file_digests(folder) == before
    # the same file errors where the weights are read (Trainer, twotower-convert): named, not SafetensorError
    with pytest.raises(CheckpointKeyError, match=f"{trunc}: model.safetensors is not a readable"):
        HFWeights.from_dir(trunc)


# ------------------------------------------------------------------------------------------ item 13
def test_generate_refuses_meaningless_arguments_before_building_a_model(tmp_path, capsys, monkeypatch):
    from twotower.training import generate, inference_model

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although the arguments are invalid")

    monkeypatch.setattr(inference_model, "load_for_inference", no_model)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"a fine prompt\ncaf\xe9 au lait\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("first\n\nthird\n")
    (tmp_path / "empty.txt").write_text("")
    src = ["--hf", str(tmp_path / "no-such-folder")]
    cases = [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "caf\udce9"], "is not valid UTF-8 text"),  # what Python makes of the argv bytes caf\xe9
        (["--prompt-file", str(latin1)], f"--prompt-file {latin1}:2: not valid UTF-8"),
        (["--prompt-file", str(blank)], f"--prompt-file {blank}:2: empty prompt"),
        (["--prompt-file", str(tmp_path / "empty.txt")], "is empty: give one prompt per line"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens=0: must be a positive integer"),
        (["--prompt", "hi", "--max-new-tokens", "-16"], "--max-new-tokens=-16: must be a positive integer"),
        (["--prompt", "hi", "--gamma", "-0.1"], "--gamma=-0.1: the confidence threshold is a probability"),
        (["--prompt", "hi", "--gamma", "nan"], "--gamma=nan: the confidence threshold is a probability"),
        (["--prompt", "hi", "--threshold", "1.5"], "--gamma=1.5: the confidence threshold is a probability"),
        (["--prompt", "hi", "--steps-per-block", "0"], "--steps-per-block=0: must be a positive integer"),
        (["--prompt", "hi", "--block-size", "0"], "--block-size=0: must be a positive integer"),
        (["--prompt", "hi", "--block-size", "-4"], "--block-size=-4: must be a positive integer"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            generate.main([*src, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "twotower-generate: error: " in err and msg in err, (args, err)
    assert latin1.read_bytes() == b"a fine prompt\ncaf\xe9 au lait\n"


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote()
