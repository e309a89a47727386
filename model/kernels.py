"""One kernel selector for the Mamba-2 mixer's CUDA kernels: the SSD chunk scan and the causal conv.

Stage: every Mamba layer call. ``ssm_backend`` (``parallel.ssm_backend``, see ``backends.py``) is
``torch``, ``mamba_ssm`` (the kernel family: mamba-ssm's Triton SSD scan and Dao-AILab's
causal-conv1d) or ``auto``. :func:`select` answers, per call, which implementation runs:

* ``auto``: the CUDA kernel when its package is installed, the tensors are on CUDA and the kernel
  supports this call (``limits``: widths, activations, memory strides), else the torch path;
* ``torch``: always the torch path;
* ``mamba_ssm``: the kernel, or a ``RuntimeError`` saying why it cannot take this call.
"""

from __future__ import annotations

from torch import Tensor

from twotower.model.backends import has_module

#: op -> (python package of its CUDA kernel)
KERNEL_PACKAGE = {"ssd": "mamba_ssm", "conv": "causal_conv1d"}
BACKENDS = ("auto", "torch", "mamba_ssm")


def select(op: str, backend: str, x: Tensor, limits: str | None = None) -> str:
    """``"kernel"`` or ``"torch"`` for op ``"ssd"`` / ``"conv"`` on input ``x``.

    ``limits``: the op's own reason the kernel cannot take this call (None: it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {op} backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    pkg = KERNEL_PACKAGE[op]
    why = None if x.is_cuda and has_module(pkg) else f"needs the {pkg} package and CUDA tensors"
    why = why or limits
    if why is None:
        return "kernel"
    if backend == "auto":
        return "torch"
    raise RuntimeError(f"ssm_backend='mamba_ssm': the {pkg} kernel cannot run this {op} call: {why}")


def conv_limits(shape: tuple[int, ...], strides: tuple[int, ...], width: int, activation: str | None
                ) -> str | None:
    """Why causal-conv1d cannot take an input of ``shape (b, d, l)`` laid out with ``strides``.

    The kernel reads channel-first (``stride(2) == 1``) or channel-last (``stride(1) == 1``) memory;
    channel-last additionally needs ``stride(0)`` and ``stride(2)`` to be multiples of 8. The mixer's
    ``xBC`` is a strided view of the fused ``in_proj`` output, i.e. channel-last with the projection
    width as stride (260 for the tiny model: not a multiple of 8). None: the kernel can."""
    if not 2 <= width <= 4 or activation not in (None, "silu", "swish"):
        return f"supports widths 2..4 and silu/None (got width {width}, {activation!r})"
    if strides[2] == 1 and shape[2] > 1:
        return None
    if strides[1] == 1 or shape[1] == 1:
        if strides[0] % 8 or strides[2] % 8:
            return f"channel-last input needs strides (batch, length) % 8 == 0 (got {strides[0]}, {strides[2]})"
        return None
    return f"needs unit stride on the channel or length dim (got strides {tuple(strides)})"
