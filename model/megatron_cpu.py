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

Two kinds of patches:

CPU-only (skipped entirely when ``torch.cuda.is_available()``): they make megatron's hard-wired CUDA
calls land on the CPU device.

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

Megatron bug fixes (applied on CUDA too; guarded by megatron version, see ``_BUGFIX_MCORE``):

7. ``te_general_gemm`` unbound: ``moe_utils`` imports it only inside ``try: import transformer_engine``
   but ``RouterGatingLinearFunction.forward`` tests ``te_general_gemm is not None`` unconditionally,
   a ``NameError`` in the MoE router without TE. We define it as ``None`` when missing.
8. ``DistributedOptimizer`` + torch Adam (no apex/TE FusedAdam: CPU, or a GPU run without TE), found
   by save -> load -> continue != uninterrupted training (tests/model/dist/distopt_resume.py):
   (a) ``load_state_dict`` puts ONE ``step`` tensor object into every param's state; torch Adam
   increments ``state['step']`` in place per param, so after a resume the step advances by #params
   per iteration and Adam's bias correction is silently wrong (``fully_reshardable``);
   (b) with ``dp_reshardable`` it then ``copy_()``s each param's *dummy* step (step is not stored in
   the checkpoint) into that tensor: the step restarts at 0 (or 1);
   (c) ``_set_main_param_and_optimizer_states`` copies every key of the live torch state, but the
   ``fully_reshardable``/``fully_sharded_model_space`` loaders drop ``step``: ``KeyError: 'step'``;
   (d) the ``dp_reshardable`` loader lacks ``@torch.no_grad()``: for fp32 params the main param is a
   view of a leaf requiring grad and ``copy_()`` raises;
   (e) ``state_dict()`` (called by ``sharded_state_dict(is_loading=True)``) needs initialised torch
   states (``assert len(steps) == 1``) on a fresh optimizer; we initialise them (zero state, step 0,
   weights untouched), see :func:`init_optimizer_states`.
   Fix: every param gets its own ``step`` tensor = the checkpoint's ``param_groups`` step, plus (c)-(e).
   Works with ``metadata={'distrib_optim_sharding_type': 'dp_reshardable' | 'fully_reshardable'}``;
   megatron's default ``fully_sharded_model_space`` fails in megatron itself on this version
   ("ShardedTensor.flattened_range is not supported"), pass one of the two explicitly.

Every patch asserts the attribute it replaces exists, so a torch / megatron upgrade fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

__all__ = [
    "CPU_ONLY",
    "CpuEvent",
    "CpuStream",
    "applied_patches",
    "apply",
    "init_optimizer_states",
]

CPU_ONLY = not torch.cuda.is_available()
#: megatron-core versions every patch was verified on; apply() raises on others (fail loudly).
_BUGFIX_MCORE = ("0.16.",)

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


# --------------------------------------------------------------------------------------------------
# 7. te_general_gemm unbound without TE (megatron bug)
# --------------------------------------------------------------------------------------------------
def _fix_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "RouterGatingLinearFunction"), "megatron_cpu: RouterGatingLinearFunction moved"
    uses = "te_general_gemm" in moe_utils.RouterGatingLinearFunction.forward.__code__.co_names
    if uses and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _APPLIED.append("te_general_gemm")


# --------------------------------------------------------------------------------------------------
# 8. DistributedOptimizer 'step' with torch Adam (megatron bug)
# --------------------------------------------------------------------------------------------------
def _fix_distopt_step() -> None:
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    assert hasattr(dopt, "HAVE_APEX_OR_TE"), "megatron_cpu: distrib_optimizer.HAVE_APEX_OR_TE gone"
    if dopt.HAVE_APEX_OR_TE:
        return  # FusedAdam keeps 'step' in param_groups: the bug is on the torch-Adam path only
    orig_load = cls.load_state_dict
    orig_state = cls.state_dict

    @functools.wraps(orig_load)
    def load_state_dict(self, state_dict):
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        assert len(steps) <= 1, f"megatron_cpu: inconsistent optimizer steps in checkpoint: {steps}"
        orig_load(self, state_dict)
        if not steps:
            return
        step = float(steps.pop())
        # (a) megatron put ONE step tensor into every param state (torch Adam increments it in place
        # per param), and (b) dp_reshardable then copy_()s each param's *dummy* step (not stored in
        # the checkpoint) into it. The checkpoint's param_groups step is the real one: give every
        # param its own tensor with that value.
        for state in self.optimizer.state.values():
            old = state.get("step")
            if isinstance(old, torch.Tensor):
                state["step"] = torch.tensor(step, dtype=old.dtype, device=old.device)

    @functools.wraps(orig_state)
    def state_dict(self):
        # (e) megatron reads s['step'] of every torch state and asserts there is exactly one value.
        states = self.optimizer.state
        if not states or any("step" not in s for s in states.values()):
            init_optimizer_states(self)
        return orig_state(self)

    orig_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(orig_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        # (c) it copies into EVERY key of the param's torch state, 'step' included, but the
        # fully_reshardable / fs_model_space loaders drop 'step' from `tensors`: KeyError: 'step'.
        # Keep the current step (load_state_dict below sets the real one from param_groups).
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
        # (d) the dp_reshardable loader lacks @torch.no_grad(): for fp32 params the main param is a
        # view of a leaf that requires grad and copy_() raises.
        with torch.no_grad():
            return orig_set(self, model_param, tensors)

    _replace(
        cls,
        "_set_main_param_and_optimizer_states",
        _set_main_param_and_optimizer_states,
        key="mcore.DistributedOptimizer._set_main_param_and_optimizer_states",
    )
    _replace(cls, "load_state_dict", load_state_dict, key="mcore.DistributedOptimizer.load_state_dict")
    _replace(cls, "state_dict", state_dict, key="mcore.DistributedOptimizer.state_dict")
    _APPLIED.append("distopt_step")


def init_optimizer_states(optimizer: Any) -> None:
    """Initialise a fresh DistributedOptimizer's torch-Adam states: zero moments, step 0.

    Loading a dist checkpoint with torch Adam needs the states to exist (megatron fills them in place).
    The patched ``DistributedOptimizer.state_dict()`` calls this by itself when the states are empty,
    so ``optimizer.sharded_state_dict(model_sd, is_loading=True, ...)`` on a fresh optimizer just works;
    calling it explicitly is harmless. Uses megatron's ``_init_optimizer_states_with_dummy_values``
    (one Adam step on zero grads) and undoes its effects: restores the main params (weight decay
    moved them) and zeroes every state tensor, with one ``step`` tensor per param.
    """
    assert hasattr(optimizer, "_init_optimizer_states_with_dummy_values"), "megatron_cpu: megatron API gone"
    inner = optimizer.optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer._init_optimizer_states_with_dummy_values()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    for state in inner.state.values():
        for k, v in list(state.items()):
            if isinstance(v, torch.Tensor):
                state[k] = torch.zeros_like(v) if k == "step" else v.zero_()


# --------------------------------------------------------------------------------------------------
def _mcore_version() -> str:
    from importlib.metadata import version  # no megatron import: apply() must run before it

    return version("megatron-core")


def apply() -> list[str]:
    """Install the patches (idempotent). Returns the names of the installed patches.

    Must run before megatron is imported. CPU-only patches are skipped when CUDA is available;
    megatron bug fixes are applied everywhere for the verified megatron versions.
    """
    if _APPLIED:
        return applied_patches()
    version = _mcore_version()
    if not version.startswith(_BUGFIX_MCORE):
        if CPU_ONLY:  # the CPU runtime depends on megatron internals: refuse rather than half-work
            raise RuntimeError(
                f"megatron_cpu: megatron-core {version} not verified (written for {_BUGFIX_MCORE}); re-run "
                "tests/model/test_megatron_cpu.py, re-check every patch, then extend _BUGFIX_MCORE"
            )
        # On GPU clusters newer megatron-core releases (0.17+, Python 3.12) run natively; the
        # 0.16 bug fixes are version-specific, so they are skipped, loudly.
        import warnings

        warnings.warn(f"megatron_cpu: megatron-core {version}: the 0.16.x bug fixes (te_general_gemm, "
                      "DistributedOptimizer Adam step on resume) are not applied; verify resume exactness "
                      "with tests/model/test_megatron_cpu.py on this version", stacklevel=2)
        _APPLIED.append("none")
        return applied_patches()
    if CPU_ONLY:
        _patch_current_device()
        _patch_streams()
        _patch_device_literals()
        _patch_tensor_type()
        _patch_torch_rng()
        _patch_megatron_rng()
        _patch_all_to_all()
    _fix_te_general_gemm()
    _fix_distopt_step()
    if not _APPLIED:
        _APPLIED.append("none")
    return applied_patches()
