"""``twotower-eval`` / ``twotower-bench-decode`` refuse bad input with a named error before any model
is loaded: exit code 2 for arguments (unknown task or decoder, gamma outside (0, inf), counts),
5 for input files (a folder that is not a TwoTower, malformed task files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import write_tasks

from twotower.training import bench_decode, evaluate
from twotower.training.eval_model import EvalUsageError, check_decoder_args


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every case here must fail before a model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for an input that should have been refused first")

    monkeypatch.setattr("twotower.training.eval_model.open_model", refuse)


@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path / "tasks", {"t": [("1+1=", "2")]})


def _run(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _eval(argv, tasks, out, capsys, source=("--hf", "/nonexistent/model")):
    return _run(evaluate.main, [*source, "--tasks", f"local:{tasks}", "--out", str(out), *argv], capsys)


def _bench(argv, tasks, out, capsys):
    return _run(bench_decode.main, ["--hf", "/nonexistent/model", "--tasks", f"local:{tasks}", "--out", str(out),
                                    *argv], capsys)


@pytest.mark.parametrize("argv, named", [
    (["--decoder", "beam"], "--decoder='beam'"),
    (["--gamma", "0"], "gamma=0.0"),
    (["--gamma", "-0.5"], "gamma=-0.5"),
    (["--gamma", "nan"], "gamma=nan"),
    (["--gamma", "inf"], "gamma=inf"),
    (["--block-size", "0"], "--block-size=0"),
    (["--batch-size", "0"], "--batch-size=0"),
])
def test_eval_usage_errors(argv, named, tasks, tmp_path, capsys):
    rc, err = _eval(argv, tasks, tmp_path / "out", capsys)
    assert rc == 2 and named in err, err


@pytest.mark.parametrize("argv, named", [
    (["--gammas", "0.8,0"], "gamma=0.0"),
    (["--gammas", "0.8,-1"], "gamma=-1.0"),
    (["--block-sizes", "4,0"], "block_size=0"),
    (["--max-new-tokens", "6", "--block-sizes", "4"], "not a multiple of block size(s) [4]"),
    (["--batch-sizes", "0"], "--batch-sizes=[0]"),
    (["--repeats", "0"], "--repeats=0"),
])
def test_bench_usage_errors(argv, named, tasks, tmp_path, capsys):
    rc, err = _bench(argv, tasks, tmp_path / "out", capsys)
    assert rc == 2 and named in err, err


def test_bench_needs_local_tasks(tmp_path, capsys):
    rc, err = _run(bench_decode.main, ["--hf", "/x", "--tasks", "gsm8k", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "local:DIR" in err


def test_gamma_above_one_is_allowed_and_unknown_decoders_are_named():
    check_decoder_args("diffusion", 1.5, 4, None)  # > 1: one token per forward, not an error
    with pytest.raises(EvalUsageError, match="decoder='beam'"):
        check_decoder_args("beam", 0.8, None, None)


@pytest.mark.slow  # lm-eval indexes its ~10k built-in task files to know every name
def test_unknown_task_is_named_before_the_model(tasks, tmp_path, capsys):
    model = _write(tmp_path / "model" / "config.json", json.dumps(
        {"model_type": "nemotron_h", "architectures": ["NemotronHTwoTowerForCausalLM"]}))
    rc, err = _run(evaluate.main, ["--hf", str(model), "--tasks", f"local:{tasks},no_such_task_xyz",
                                   "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "unknown task(s): no_such_task_xyz" in err


def test_unknown_model_args_are_named():
    from twotower.training.lm_eval_model import TwoTowerLM

    with pytest.raises(EvalUsageError, match="unknown gama"):
        TwoTowerLM(hf="/x", gama=0.5)
    with pytest.raises(EvalUsageError, match="decoder='greedy'"):
        TwoTowerLM(hf="/x", decoder="greedy")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.parent


@pytest.mark.parametrize("content, named", [
    ('{"prompt": "a", "answer": "b"}\nnot json\n', "t.jsonl:2: not a JSON object"),
    ('{"prompt": "a"}\n', 't.jsonl:1: expected {"prompt": str, "answer": str}'),
    ('{"prompt": "a", "answer": 3}\n', "t.jsonl:1: expected"),
    ('{"prompt": "", "answer": "b"}\n', "t.jsonl:1: empty prompt"),
    ("\n\n", "t.jsonl: no records"),
])
@pytest.mark.parametrize("main", [evaluate.main, bench_decode.main])
def test_malformed_task_files_are_named(content, named, main, tmp_path, capsys):
    folder = _write(tmp_path / "bad" / "t.jsonl", content)
    rc, err = _run(main, ["--hf", "/x", "--tasks", f"local:{folder}", "--out", str(tmp_path / "out")], capsys)
    assert rc == 5 and named in err, err


def test_missing_or_empty_task_folder(tmp_path, capsys):
    rc, err = _run(evaluate.main, ["--hf", "/x", "--tasks", f"local:{tmp_path / 'nope'}", "--out", str(tmp_path)],
                   capsys)
    assert rc == 5 and "no such folder" in err
    (tmp_path / "empty").mkdir()
    rc, err = _run(evaluate.main, ["--hf", "/x", "--tasks", f"local:{tmp_path / 'empty'}", "--out", str(tmp_path)],
                   capsys)
    assert rc == 5 and "no <task_name>.jsonl files" in err


def _backbone_folder(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
    from hf_tiny import tiny_hf_model

    tiny_hf_model("all_types", seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["missing", "no_config", "other_model", "backbone"])
@pytest.mark.parametrize("main", [evaluate.main, bench_decode.main])
def test_a_folder_that_is_not_a_twotower(kind, main, tasks, tmp_path, capsys):
    folder = tmp_path / "model"
    if kind == "no_config":
        folder.mkdir()
    elif kind == "other_model":
        _write(folder / "config.json", json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    elif kind == "backbone":
        _backbone_folder(folder)
    rc, err = _run(main, ["--hf", str(folder), "--tasks", f"local:{tasks}", "--out", str(tmp_path / "out")], capsys)
    assert rc == 5 and str(folder) in err, err
    expected = {"missing": "no such folder", "no_config": "no config.json", "other_model": "model_type='llama'",
                "backbone": "a NemotronH backbone (no denoiser_tower), not a TwoTower"}[kind]
    assert expected in err, err


@pytest.mark.parametrize("source, named", [(["--run", "{tmp}"], "no config.yaml (not a twotower-train run directory)"),
                                           (["--run", "{tmp}/nope"], "no such file or folder"),
                                           (["--checkpoint", "{tmp}/nope"], "no such file or folder")])
def test_a_run_or_checkpoint_that_is_not_there(source, named, tasks, tmp_path, capsys):
    rc, err = _eval([], tasks, tmp_path / "out", capsys, source=[s.format(tmp=tmp_path) for s in source])
    assert rc == 5 and named in err, err
