"""Which compute backends this host has, and the one place that resolves ``auto``.

Stage: config validation (before any process group) and model construction. Three keys of
``ParallelConfig`` choose backends, each resolved once per process here:

=====================  =================================  ============================================
key                    values                             ``auto`` picks
=====================  =================================  ============================================
``transformer_impl``   ``local``, ``transformer_engine``  ``transformer_engine`` when TE is installed
                                                          and CUDA is present, else ``local``
                                                          (megatron's tensor-parallel layers)
``attention_backend``  ``sdpa``, ``flex``                 ``flex`` on CUDA, else ``sdpa``
``ssm_backend``        ``torch``, ``mamba_ssm``           ``mamba_ssm`` (mamba-ssm SSD scan +
                                                          causal-conv1d) on CUDA when installed, else
                                                          ``torch``; per call ``kernels.select`` still
                                                          falls back where a kernel cannot take the
                                                          inputs (``auto`` only)
=====================  =================================  ============================================

Unknown values are refused when the config is built; values this host cannot run (``transformer_engine``
without TE or CUDA, ``mamba_ssm`` without the kernels) are refused by :func:`check_available`, named
with what is installed. Nothing here imports TE or the kernels: ``find_spec`` only (an installed
TE wheel without CUDA crashes on import).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

CHOICES = {
    "transformer_impl": ("auto", "local", "transformer_engine"),
    "attention_backend": ("auto", "sdpa", "flex"),
    "ssm_backend": ("auto", "torch", "mamba_ssm"),
}
#: Python packages each non-default backend needs (besides CUDA).
NEEDS = {"transformer_engine": ("transformer_engine",), "mamba_ssm": ("mamba_ssm", "causal_conv1d")}


@functools.cache
def has_module(name: str) -> bool:
    """Whether ``name`` is installed (no import)."""
    return importlib.util.find_spec(name) is not None


def installed() -> str:
    """One line: CUDA and the optional GPU packages on this host (for error messages)."""
    mods = [f"{m} {'yes' if has_module(m) else 'no'}" for m in ("transformer_engine", "mamba_ssm", "causal_conv1d")]
    return f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, " + ", ".join(mods)


def check_choice(key: str, value: str) -> str | None:
    """Why ``value`` is not a valid ``parallel.{key}`` (None: it is)."""
    if value not in CHOICES[key]:
        return f"parallel.{key}={value!r}: use one of {', '.join(CHOICES[key])}"
    return None


def unavailable(value: str) -> str | None:
    """Why backend ``value`` cannot run on this host (None: it can)."""
    needs = NEEDS.get(value)
    if needs is None:
        return None
    missing = [m for m in needs if not has_module(m)]
    if missing or not torch.cuda.is_available():
        return f"needs CUDA and {' + '.join(needs)}; installed here: {installed()}"
    return None


def check_available(transformer_impl: str, attention_backend: str, ssm_backend: str) -> None:
    """Raise ``ConfigError`` naming the first key whose backend this host cannot run."""
    from twotower.model.config import ConfigError

    for key, value in (("transformer_impl", transformer_impl), ("attention_backend", attention_backend),
                       ("ssm_backend", ssm_backend)):
        why = check_choice(key, value) or unavailable(value)
        if why:
            raise ConfigError(why if why.startswith("parallel.") else f"parallel.{key}={value!r} {why}")


def resolve(key: str, value: str) -> str:
    """The concrete backend for ``parallel.{key}=value`` on this host (``auto`` resolved)."""
    if value != "auto":
        return value
    cuda = torch.cuda.is_available()
    if key == "transformer_impl":
        return "transformer_engine" if cuda and unavailable("transformer_engine") is None else "local"
    if key == "attention_backend":
        return "flex" if cuda else "sdpa"
    return "mamba_ssm" if cuda and unavailable("mamba_ssm") is None else "torch"
