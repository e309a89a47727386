"""megatron-core bug fixes twotower relies on, on every host (CPU and CUDA), for the verified versions.

Applied by :func:`twotower.model.megatron_cpu.apply` (the entry points call it; on a CUDA host it
applies only these). Guarded by megatron version (:data:`VERIFIED_MCORE`): on another version they are
skipped with a warning, since each one patches megatron internals.

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

Every fix asserts the attribute it replaces exists, so a megatron upgrade fails loudly.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

__all__ = ["VERIFIED_MCORE", "apply", "init_optimizer_states", "mcore_version"]

#: megatron-core versions every fix (and every CPU patch of megatron_cpu) was verified on.
VERIFIED_MCORE = ("0.16.",)

_APPLIED: list[str] = []
_ORIG: dict[str, Any] = {}


def _replace(owner: Any, name: str, new: Any, key: str) -> None:
    """Set ``owner.name = new`` after asserting ``owner.name`` exists; keep the original."""
    assert hasattr(owner, name), f"megatron_fixes: {owner!r} has no attribute {name!r} (megatron upgrade?)"
    _ORIG[key] = getattr(owner, name)
    setattr(owner, name, new)


def mcore_version() -> str:
    from importlib.metadata import version  # no megatron import: the fixes must run before it

    return version("megatron-core")


def apply() -> list[str]:
    """Install the fixes for the verified megatron versions (idempotent); returns their names."""
    if _APPLIED:
        return list(_APPLIED)
    version = mcore_version()
    if not version.startswith(VERIFIED_MCORE):
        # On GPU clusters newer megatron-core releases (0.17+, Python 3.12) run natively; the 0.16
        # fixes are version-specific, so they are skipped, loudly.
        warnings.warn(f"megatron_fixes: megatron-core {version}: the 0.16.x bug fixes (te_general_gemm, "
                      "DistributedOptimizer Adam step on resume) are not applied; verify resume exactness "
                      "with tests/model/test_megatron_cpu.py on this version", stacklevel=2)
        return []
    _fix_te_general_gemm()
    _fix_distopt_step()
    return list(_APPLIED)


# --------------------------------------------------------------------------------------------------
# 7. te_general_gemm unbound without TE (megatron bug)
# --------------------------------------------------------------------------------------------------
def _fix_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "RouterGatingLinearFunction"), "megatron_fixes: RouterGatingLinearFunction moved"
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
    assert hasattr(dopt, "HAVE_APEX_OR_TE"), "megatron_fixes: distrib_optimizer.HAVE_APEX_OR_TE gone"
    if dopt.HAVE_APEX_OR_TE:
        return  # FusedAdam keeps 'step' in param_groups: the bug is on the torch-Adam path only
    orig_load = cls.load_state_dict
    orig_state = cls.state_dict

    @functools.wraps(orig_load)
    def load_state_dict(self, state_dict):
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if g.get("step") is not None}
        assert len(steps) <= 1, f"megatron_fixes: inconsistent optimizer steps in checkpoint: {steps}"
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
    assert hasattr(optimizer, "_init_optimizer_states_with_dummy_values"), "megatron_fixes: megatron API gone"
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
