"""Task lists for ``twotower-eval`` / ``twotower-bench-decode``: lm-eval's tasks by name, and local
tasks from JSONL files, so that evaluation runs offline.

Stage: evaluation. Input: ``--tasks`` items, each a standard lm-eval task / group name
(``mmlu``, ``gsm8k``, ... wherever their datasets are reachable) or ``local:DIR``. ``DIR`` holds
``<task_name>.jsonl`` files whose lines are ``{"prompt": str, "answer": str}``. Output: lm-eval
task YAMLs written into a folder for ``TaskManager(include_path=...)`` — one ``generate_until``
task per file over the local JSON file (``dataset_path: json``), ``until: ["\\n"]``, metric
``exact_match`` of the continuation, stripped of surrounding whitespace, against the answer.

The same YAML folder works with lm-eval's own CLI (``lm_eval --include_path DIR --tasks NAME``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from twotower.training.eval_model import EvalInputError, EvalUsageError

LOCAL_PREFIX = "local:"
DEFAULT_UNTIL = ["\n"]


@dataclass
class LocalTask:
    name: str
    path: Path
    records: list[dict]
    """``{"prompt": str, "answer": str}`` per line, in file order."""


@dataclass
class TaskSelection:
    standard: list[str] = field(default_factory=list)
    local: list[LocalTask] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.local] + self.standard


def read_local_dir(folder: str | Path) -> list[LocalTask]:
    """Every ``*.jsonl`` of ``folder``, each line checked (:class:`EvalInputError` names file and line)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalInputError(f"{LOCAL_PREFIX}{folder}: no such folder (expected a folder of <task>.jsonl files)")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise EvalInputError(f"{LOCAL_PREFIX}{folder}: no <task_name>.jsonl files in it")
    return [LocalTask(f.stem, f.resolve(), read_jsonl(f)) for f in files]


def read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 text ({e.reason})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "answer")):
            raise EvalInputError(f'{path}:{i}: expected {{"prompt": str, "answer": str}}, got {line[:80]!r}')
        if not rec["prompt"]:
            raise EvalInputError(f"{path}:{i}: empty prompt")
        records.append({"prompt": rec["prompt"], "answer": rec["answer"]})
    if not records:
        raise EvalInputError(f"{path}: no records")
    return records


def select_tasks(items: list[str]) -> TaskSelection:
    """Split ``--tasks`` items into standard names and local tasks (files read and checked here)."""
    sel = TaskSelection()
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.startswith(LOCAL_PREFIX):
            sel.local += read_local_dir(item[len(LOCAL_PREFIX):])
        else:
            sel.standard.append(item)
    if not sel.names:
        raise EvalUsageError("--tasks is empty: give lm-eval task names and/or local:DIR")
    dup = sorted({n for n in sel.names if sel.names.count(n) > 1})
    if dup:
        raise EvalUsageError(f"--tasks: task name(s) {', '.join(dup)} given twice")
    return sel


def task_yaml(task: LocalTask, max_gen_toks: int) -> dict:
    """The lm-eval task config of one local task (``generate_until``, exact match after strip)."""
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task.path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",  # a field name: lm-eval reads doc["prompt"] as is (no Jinja)
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": list(DEFAULT_UNTIL), "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        "metadata": {"version": 1.0},
    }


def write_task_yamls(tasks: list[LocalTask], folder: str | Path, max_gen_toks: int) -> Path:
    """One ``<name>.yaml`` per local task in ``folder`` (for ``TaskManager(include_path=folder)``)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        (folder / f"{t.name}.yaml").write_text(yaml.safe_dump(task_yaml(t, max_gen_toks), sort_keys=False))
    return folder


def task_manager(sel: TaskSelection, yaml_dir: Path | None):
    """lm-eval's ``TaskManager`` over the local YAMLs (and the built-in tasks when any is named);
    an unknown standard name is an :class:`EvalUsageError` naming it."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(yaml_dir) if yaml_dir else None, include_defaults=bool(sel.standard))
    unknown = [n for n in sel.standard if n not in tm.all_tasks]
    if unknown:
        raise EvalUsageError(f"unknown task(s): {', '.join(unknown)} (not an lm-eval task, group or tag; "
                             "local tasks are given as local:DIR)")
    return tm
