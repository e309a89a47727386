"""Configuration problems that Hydra and OmegaConf find, reworded to name the key (stage: start-up).

``twotower-train`` composes ``conf/`` with the command line through Hydra. Two kinds of mistakes
never reach the dataclasses' own checks (training/config.py):

* composition errors: an unknown key (``trainer.max_stepz=3``), a wrong type
  (``trainer.max_steps=abc``), an unknown experiment or group option, an override below a node that
  is null (``experiment=smoke_cpu data.train.0.path=DIR``: that experiment sets ``data: null``).
  Hydra raises them before the job starts; :func:`composition_error_message` turns each into one
  line that names the key and what to do, and ``twotower-train`` exits 2.
* keys *added* with ``+`` (``+optim.lr_typo=5``): Hydra lifts the schema's struct flag for them, so
  they would be silently ignored; :func:`unknown_keys` finds every key the schema does not have.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` (a merged, schema-typed config) that its dataclass types lack, each
    with the closest known field: ``["optim.lr_typo (OptimConfig has no such field; did you mean lr?)"]``."""
    out: list[str] = []
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return out  # a null group (data: null) or a ??? value: nothing to check below it
    if isinstance(node, DictConfig):
        typ = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
        for key, value in node.items_ex(resolve=False):
            name = f"{prefix}{key}"
            if known is not None and key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; its fields: {', '.join(sorted(known))}"
                out.append(f"{name} ({typ.__name__} has no such field{hint})")
            elif isinstance(value, (DictConfig, ListConfig)):
                out += unknown_keys(value, name + ".")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                out += unknown_keys(child, f"{prefix}{i}.")
    return out


def composition_error_message(err: BaseException) -> str:
    """One line (plus Hydra's option list where it has one) for an error Hydra raised while
    composing the config: the override and key at fault and what to change."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    override = _frame_local(err, "_apply_overrides_to_config", "override")
    line = getattr(override, "input_line", None)
    if isinstance(err, AssertionError) and line is not None:  # OmegaConf.update met a null node
        split, i = _frame_local(err, "update", "split"), _frame_local(err, "update", "i")
        if split and isinstance(i, int) and 0 < i < len(split):
            null = ".".join(split[:i])
            key = ".".join(split)
            return (f"override '{line}': {null} is null in this configuration (an experiment or a group sets "
                    f"it to null), so {key} cannot be set. {_choose_first(null, line)}")
    if isinstance(err, (MissingConfigException, OverrideParseException)):
        return str(err).split("\nConfig search path")[0].strip()
    src = cause if getattr(cause, "full_key", None) else err if getattr(err, "full_key", None) else None
    if src is not None:
        key = src.full_key
        msg = str(getattr(src, "msg", src)).split("\n")[0]
        if type(src).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
            return (f"unknown key {key} ({msg}); keys are checked against the schema in "
                    "twotower.training.config (a leading '+' does not add a field either)")
        extra = ""
        if line and any(part.isdigit() for part in line.split("=")[0].split(".")):
            extra = " (a list override can only change an existing entry; give the whole list instead, e.g. " \
                    "'data.train=[{path: DIR, weight: 1.0}]')"
        return f"override '{line}': {key}: {msg}{extra}" if line else f"{key}: {msg}{extra}"
    text = str(err).split("\nConfig search path")[0].strip()
    return f"{text} ({type(err).__name__})" if text else type(err).__name__


def _frame_local(err: BaseException, function: str, name: str) -> Any:
    """Local ``name`` of the innermost frame of ``function`` in ``err``'s traceback (or None)."""
    found = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function and name in tb.tb_frame.f_locals:
            found = tb.tb_frame.f_locals[name]
        tb = tb.tb_next
    return found


def _choose_first(null: str, line: str) -> str:
    try:
        group = resources.files("twotower.conf") / null
        options = sorted(p.name[:-5] for p in group.iterdir() if p.name.endswith(".yaml")) if group.is_dir() else []
    except (ModuleNotFoundError, OSError):
        options = []
    if options:
        return (f"Choose a {null} config first, e.g. '{null}={options[0]} {line}' (options: "
                f"{', '.join(options)}), or set the whole node.")
    return f"Set the whole node {null} instead."
