"""Where a model is built: every parameter and buffer is created on one device, by construction.

Stage: model construction (``build_backbone``, ``build_two_tower``). Our own modules take
``device=`` explicitly; megatron's modules are built inside :func:`building_on`, which

* makes ``device`` torch's default device (``with torch.device(device)``): megatron's CPU-init
  path (``use_cpu_initialization``, on ``cpu`` and ``meta``) allocates without a ``device=``;
* on CUDA, makes ``device`` the current CUDA device: megatron's GPU path allocates on
  ``torch.cuda.current_device()`` (and on a CPU host the CPU runtime layer answers that with the
  default device, so a ``meta`` build puts megatron's buffers on ``meta`` too).

No ``.to(device)`` afterwards: a test builds every model kind on ``meta`` and finds every tensor there.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None``: the device of an active ``with torch.device(...)`` context, else this rank's current
    CUDA device when CUDA is present, else the CPU."""
    if device is None:
        default = torch.get_default_device()
        if default.type != "cpu":
            return default
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else default
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def building_on(device: torch.device):
    """Context in which megatron's modules allocate on ``device`` (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device(device))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        yield
