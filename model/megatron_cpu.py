"""CPU runtime layer for megatron-core: run megatron 0.16.x on a CPU-only torch build with gloo.

Nothing is patched on import: the entry points (``twotower-train``/``-generate``/``-convert``/``-demo``,
the tests' ``conftest.py``, the benchmarks) call :func:`apply` explicitly, first thing, and
:func:`twotower.model.parallel_init.init_parallel` calls it again (idempotent) so that no megatron
world is ever built on a CPU host without it. A test (``tests/model/test_import_hygiene.py``) checks in
a fresh interpreter that importing every twotower package leaves torch untouched. Call it **before
megatron is imported** where you can. Megatron binds some torch names at import time (e.g.
``from torch.cuda import _lazy_call`` in ``tensor_parallel.random``) and runs CUDA probes in module
code, so the supported order is "apply first"; ``apply()`` then imports the megatron modules it fixes
itself (importing ``twotower.model`` therefore imports megatron, ~4 s). All current patches are looked
up at call time, so a late ``apply()`` still works, but do not rely on it. ``apply()`` is idempotent.

The CPU patches (skipped entirely when ``torch.cuda.is_available()``) make megatron's hard-wired
CUDA calls land on the CPU device:

1. ``torch.cuda.current_device()`` -> torch's default device (the CPU, or the device of an active
   ``with torch.device(...)`` context: a model built on ``meta`` gets megatron's buffers there too):
   ~175 megatron call sites allocate with ``device=torch.cuda.current_device()`` (grad buffers,
   optimizer shards, p2p buffers, the MoE router's buffers).
2. CUDA streams/events: ``torch.cuda.Stream/Event/current_stream/default_stream/stream/synchronize``
   become no-op stand-ins (CPU ops are synchronous): the MoE alltoall dispatcher's DtoH stream,
   pipeline p2p and checkpoint save call them unconditionally.
3. ``device='cuda'`` literals: the torch tensor factories (``torch.tensor/zeros/ones/empty/full/
   arange/...``) map a CUDA ``device=`` to the CPU and drop ``pin_memory`` (no pinned allocator
   without an accelerator); ``Tensor.cuda()`` returns the tensor itself. ~40 literals in megatron
   (schedules' ``total_num_tokens``, optimizer ``found_inf``, clip_grads, grad-buffer warmup,
   ``broadcast_data``...). We wrap these functions instead of installing a ``TorchFunctionMode``: a
   mode costs ~10% on every op and is thread-local. The wrappers are registered as TorchScript
   builtins (``torch.jit.script`` still compiles code calling them) and are traceable by dynamo.
   ``Tensor.to('cuda')`` / ``.new_*(device='cuda')`` are NOT patched: megatron 0.16 only uses
   ``.to(torch.cuda.current_device())`` (-> CPU via patch 1); a ``.to`` wrapper would break
   ``torch.compile(fullgraph=True)`` (dynamo cannot call ``TensorBase.to`` as a function).
4. ``Tensor.type()`` (no argument) reports CPU tensors as ``torch.cuda.<T>Tensor``: megatron's
   optimizers and ``clip_grads`` compare against ``'torch.cuda.FloatTensor'`` strings and raise
   otherwise. ``Tensor.type(dtype)`` (a conversion) is untouched.
5. CUDA RNG -> CPU RNG: ``torch.cuda.{get,set}_rng_state/manual_seed/manual_seed_all`` and megatron's
   ``tensor_parallel.random._set_cuda_rng_state`` act on the CPU default generator (CPU dropout uses it),
   so ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work. Unpatched,
   ``_set_cuda_rng_state`` queues a ``_lazy_call`` that never runs on a CPU build: silently wrong.
6. ``all_to_all`` split sizes: megatron's alltoall dispatcher only moves its split-size tensors to host
   lists when they are CUDA tensors; on CPU they reach ``all_to_all_single`` as tensors and gloo/c10d
   needs ``list[int]``. ``tensor_parallel.mappings._AllToAll.forward`` converts them.

Megatron bug fixes (te_general_gemm unbound without TE; the DistributedOptimizer's Adam ``step`` on
resume) apply on CUDA too and live in :mod:`twotower.model.megatron_fixes`; :func:`apply` applies them.

Every patch asserts the attribute it replaces exists, so a torch / megatron upgrade fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

__all__ = ["CPU_ONLY", "CpuEvent", "CpuStream", "applied_patches", "apply"]

CPU_ONLY = not torch.cuda.is_available()

_APPLIED: list[str] = []
_ORIG: dict[str, Any] = {}
_CPU = torch.device("cpu")


def applied_patches() -> list[str]:
    """Names of the patches :func:`apply` installed in this process (empty before ``apply()``)."""
    return list(_APPLIED)


def _replace(owner: Any, name: str, new: Any, key: str | None = None) -> None:
    """Set ``owner.name = new`` after asserting ``owner.name`` exists; keep the original."""
    assert hasattr(owner, name), (
        f"megatron_cpu: {owner!r} has no attribute {name!r} (torch/megatron upgrade?)"
    )
    _ORIG[key or f"{getattr(owner, '__name__', owner)}.{name}"] = getattr(owner, name)
    setattr(owner, name, new)


# --------------------------------------------------------------------------------------------------
# 1. current_device
# --------------------------------------------------------------------------------------------------
def _patch_current_device() -> None:
    from torch import overrides
    from torch.utils import _device

    assert hasattr(overrides, "_get_current_function_mode_stack") and hasattr(_device, "DeviceContext"), (
        "megatron_cpu: torch's DeviceContext internals moved (torch upgrade?)")

    def current_device() -> torch.device:
        # torch.get_default_device() without its per-call tensor allocation (megatron asks often)
        for mode in reversed(overrides._get_current_function_mode_stack()):
            if isinstance(mode, _device.DeviceContext):
                return mode.device
        return _CPU

    _replace(torch.cuda, "current_device", current_device)
    _APPLIED.append("current_device")


# --------------------------------------------------------------------------------------------------
# 2. streams / events
# --------------------------------------------------------------------------------------------------
class CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so every event is complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: CpuEvent) -> float:
        if self._time is None or end_event._time is None:
            return 0.0
        return (end_event._time - self._time) * 1000.0


class CpuStream:
    """Stand-in for ``torch.cuda.Stream``: one synchronous queue, all methods no-ops."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_DEFAULT_STREAM = CpuStream()


def _patch_streams() -> None:
    _replace(torch.cuda, "Stream", CpuStream)
    _replace(torch.cuda, "Event", CpuEvent)
    _replace(torch.cuda, "current_stream", lambda device=None: _DEFAULT_STREAM)
    _replace(torch.cuda, "default_stream", lambda device=None: _DEFAULT_STREAM)
    _replace(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext(stream))
    _replace(torch.cuda, "synchronize", lambda device=None: None)
    _APPLIED.append("streams")


# --------------------------------------------------------------------------------------------------
# 3. device='cuda' literals
# --------------------------------------------------------------------------------------------------
def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``'cuda'``, ``'cuda:1'``, ``torch.device('cuda')``, an int) to CPU."""
    if device is None:
        return None
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare int is an accelerator index
    return device


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace",
    "eye", "rand", "randn", "randint", "randperm", "empty_strided", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
)  # fmt: skip


def _wrap_factory(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # no pinned allocator without an accelerator
        return fn(*args, **kwargs)

    wrapper.__megatron_cpu_orig__ = fn  # type: ignore[attr-defined]
    return wrapper


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, memory_format=None):
    # like .cuda() on a tensor already on the device: no copy. Pure python so dynamo can trace it.
    if memory_format is None or memory_format is torch.preserve_format:
        return self
    return self.contiguous(memory_format=memory_format)


def _patch_device_literals() -> None:
    from torch.jit import _builtins
    from torch.utils import _device

    # `with torch.device(d):` (DeviceContext) recognises factories by identity in a cached set built
    # on first use: build it from the original functions (our wrappers call them, so a meta or CPU
    # build context still reaches every megatron allocation).
    _device._device_constructors()

    for name in _FACTORIES:
        orig = getattr(torch, name)
        wrapper = _wrap_factory(orig)
        _replace(torch, name, wrapper, key=f"torch.{name}")
        op = _builtins._find_builtin(orig)
        if op is not None:  # keep torch.jit.script working on code calling the factory
            _builtins._register_builtin(wrapper, op)
    _replace(torch.Tensor, "cuda", _tensor_cuda, key="Tensor.cuda")
    _APPLIED.append("device_literals")


# --------------------------------------------------------------------------------------------------
# 4. Tensor.type() strings
# --------------------------------------------------------------------------------------------------
def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    orig = _ORIG["Tensor.type"]
    if dtype is None and not kwargs:
        name = orig(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    if isinstance(dtype, torch.dtype) and not kwargs:
        return self.to(dtype, non_blocking=non_blocking)  # same result, and traceable by dynamo
    return orig(self, dtype, non_blocking, **kwargs)


def _patch_tensor_type() -> None:
    _replace(torch.Tensor, "type", _tensor_type, key="Tensor.type")
    _APPLIED.append("tensor_type")


# --------------------------------------------------------------------------------------------------
# 5. CUDA RNG -> CPU RNG
# --------------------------------------------------------------------------------------------------
def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.default_generator.set_state(new_state)


def _patch_torch_rng() -> None:
    get_state = lambda device="cuda": torch.get_rng_state()
    set_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    seed = lambda s: torch.default_generator.manual_seed(int(s)) and None
    for owner in (torch.cuda, torch.cuda.random):
        _replace(owner, "get_rng_state", get_state, key=f"{owner.__name__}.get_rng_state")
        _replace(owner, "set_rng_state", set_state, key=f"{owner.__name__}.set_rng_state")
        _replace(owner, "manual_seed", seed, key=f"{owner.__name__}.manual_seed")
        # manual_seed_all is left alone: torch.manual_seed calls it and it is a no-op on CPU.
    _APPLIED.append("torch_rng")


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # _get_cuda_rng_state(graph_safe=False) calls torch.cuda.random.get_rng_state -> patched above.
    _replace(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state, key="mcore.random._set_cuda_rng_state")
    _APPLIED.append("megatron_rng")


# --------------------------------------------------------------------------------------------------
# 6. all_to_all split sizes
# --------------------------------------------------------------------------------------------------
def _as_split_list(sizes: Any) -> Any:
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]  # numpy array, tuple


def _patch_all_to_all() -> None:
    from megatron.core.tensor_parallel import mappings

    fn = mappings._AllToAll
    orig_forward = fn.forward

    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        return orig_forward(
            ctx, group, input, _as_split_list(output_split_sizes), _as_split_list(input_split_sizes)
        )

    _replace(fn, "forward", staticmethod(forward), key="mcore._AllToAll.forward")
    _APPLIED.append("all_to_all_splits")


def apply() -> list[str]:
    """Install the CPU patches (CPU-only hosts) and the megatron bug fixes (idempotent). Returns the
    names of everything installed. Run it before megatron is imported."""
    from twotower.model import megatron_fixes

    if _APPLIED:
        return applied_patches()
    version = megatron_fixes.mcore_version()
    if CPU_ONLY and not version.startswith(megatron_fixes.VERIFIED_MCORE):
        # the CPU runtime depends on megatron internals: refuse rather than half-work
        raise RuntimeError(
            f"megatron_cpu: megatron-core {version} not verified (written for {megatron_fixes.VERIFIED_MCORE}); "
            "re-run tests/model/test_megatron_cpu.py, re-check every patch, then extend VERIFIED_MCORE")
    if CPU_ONLY:
        _patch_current_device()
        _patch_streams()
        _patch_device_literals()
        _patch_tensor_type()
        _patch_torch_rng()
        _patch_megatron_rng()
        _patch_all_to_all()
    _APPLIED.extend(megatron_fixes.apply())
    if not _APPLIED:
        _APPLIED.append("none")
    return applied_patches()
