"""TP/EP/PP-independent sharded state dicts (megatron ``dist_checkpointing``) for our modules.

Stage: checkpointing. ``*_sharded_state_dict(module, prefix, sharded_offsets, metadata)`` return
megatron ``ShardedStateDict`` s whose keys and global shapes do not depend on the parallel layout,
so a checkpoint saved at TP=2/EP=2/PP=2 loads at any other layout:

* ``MambaMixer``: the fused ``in_proj`` (rank-local ``[z_r; x_r; B_r; C_r; dt_r]``) and
  ``conv1d_weight/bias`` (``[x_r; B_r; C_r]``) are split by ``ShardedTensorFactory`` s into their
  components, each TP-sharded on dim 0 (keys ``...in_proj.weight.z`` etc., as megatron's mixer);
  ``A_log, D, dt_bias, norm.weight`` TP dim 0; ``out_proj`` RowParallel (dim 1).
* ``NemotronHModel``: layers keyed by their GLOBAL index (``layers.{layer_offset + j}.``), so
  pipeline stages write disjoint keys; embedding / final norm / head only where built.
* ``HybridLayer``: megatron's default recursion (norm replicated; attention ``linear_qkv`` is
  group-major so its plain dim-0 sharding is TP-independent; ``MoELayer`` is EP-aware itself).
* ``TwoTowerModel``: :func:`twotower_sharded_state_dict` (denoiser + adaLN; the frozen context
  tower is not saved, only its fingerprint, see :func:`context_fingerprint`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)


def split_tensor_factory(orig: ShardedTensor, sections: list[int], names: list[str], dim: int = 0
                         ) -> ShardedTensorFactory:
    """A factory saving ``orig`` (a rank-local concatenation of TP-sharded components along ``dim``)
    as independent sharded tensors ``{key}.{name}`` (copy of megatron's mamba ``_split_tensor_factory``)."""
    assert isinstance(orig, ShardedTensor), type(orig)
    nodata = orig.without_data()
    if sum(sections) != nodata.local_shape[dim]:
        raise ValueError(f"{orig.key}: split sections {sections} do not cover the local size "
                         f"{nodata.local_shape[dim]} of dim {dim}")

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        sh = replace(nodata, key=key, data=t, dtype=t.dtype, replica_id=replica_id, flattened_range=flattened_range)
        out, start = [], 0
        for size, name in zip(sections, names):
            for chunk in sh.narrow(dim, start, size):
                chunk.key = f"{chunk.key}.{name}"
                out.append(chunk)
            start += size
        return out

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts, dim=dim)

    return ShardedTensorFactory(orig.key, orig.data, build, merge, orig.replica_id)


def mamba_sharded_state_dict(mixer, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_cp = metadata["dp_cp_group"]
    own = {}
    mixer._save_to_state_dict(own, "", keep_vars=True)  # conv1d_weight/bias, A_log, D, dt_bias
    sd = make_sharded_tensors_for_checkpoint(
        own, prefix, {k: 0 for k in own}, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp)
    sd.update(make_sharded_tensors_for_checkpoint(
        mixer.norm.state_dict(prefix="", keep_vars=True), f"{prefix}norm.", {"weight": 0}, sharded_offsets,
        tp_group=tp_group, dp_cp_group=dp_cp))
    sd.update(mixer.in_proj.sharded_state_dict(f"{prefix}in_proj.", sharded_offsets, metadata))
    sd.update(mixer.out_proj.sharded_state_dict(f"{prefix}out_proj.", sharded_offsets, metadata))
    di, bc, nh = mixer.d_inner_local, mixer.bc_local, mixer.heads_local
    k = f"{prefix}in_proj.weight"
    sd[k] = split_tensor_factory(sd[k], [di, di, bc, bc, nh], ["z", "x", "B", "C", "dt"])
    for name in ("conv1d_weight", "conv1d_bias"):
        k = f"{prefix}{name}"
        if k in sd:
            sd[k] = split_tensor_factory(sd[k], [di, bc, bc], ["x", "B", "C"])
    return sd


def backbone_sharded_state_dict(model, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    """``NemotronHModel``: children by megatron's defaults, layers under their global index."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    sd = {}
    for name, module in model.named_children():
        if name == "layers":
            for j, layer in enumerate(module):
                sd.update(layer.sharded_state_dict(f"{prefix}layers.{model.layer_offset + j}.",
                                                   sharded_offsets, metadata))
        else:
            sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                 tp_group=parallel_state.get_tensor_model_parallel_group()))
    return sd


@torch.no_grad()
def context_fingerprint(tower) -> dict[str, float]:
    """Float64 sums of the (frozen) context tower's weights, over the whole model (all ranks of
    the TP/PP/EP groups): ``{"sum", "abs_sum", "sq_sum"}``, equal at any layout up to float64 summation order.

    TP-split tensors are summed over TP once; replicated ones are counted on TP rank 0 only;
    the totals are all-reduced over the whole world and divided by the DP replication.
    """
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # Each distinct shard is counted by exactly one rank per model replica: sum over the world and
    # divide by the number of replicas (DP size for dense params, expert-DP size for experts).
    # The sums stay on the parameters' device (NCCL reduces device tensors) and accumulate in
    # fp64 without a full-size fp64 copy of any parameter.
    device = next(tower.parameters()).device
    dense = torch.zeros(3, dtype=torch.float64, device=device)
    expert_v = torch.zeros(3, dtype=torch.float64, device=device)
    for p in tower.parameters():
        is_expert = not getattr(p, "allreduce", True)
        if is_expert:
            if parallel_state.get_expert_tensor_parallel_rank() != 0:
                continue
        elif not param_is_not_tensor_parallel_duplicate(p) and tp_rank != 0:
            continue
        d = p.detach()
        v = torch.stack([d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, 1, dtype=torch.float64),
                         torch.linalg.vector_norm(d, 2, dtype=torch.float64).square()])
        if is_expert:
            expert_v += v
        else:
            dense += v
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(dense)
        torch.distributed.all_reduce(expert_v)
        dense /= parallel_state.get_data_parallel_world_size()
        expert_v /= parallel_state.get_expert_data_parallel_world_size()
    vals = (dense + expert_v).tolist()  # one host read (at save / resume, not in the step)
    return {"sum": vals[0], "abs_sum": vals[1], "sq_sum": vals[2]}


def twotower_sharded_state_dict(model, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    """Sharded state of a ``TwoTowerModel``'s trained parts: ``denoiser_tower.*`` and the time
    conditioning under the release's names (``t_embedder.*``, ``t_block.*`` replicated;
    ``scale_shift_tables.{i}`` keyed by global layer, so PP-independent), plus
    ``context_fingerprint`` (a replicated ``ShardedObject``; after loading it holds the saved
    fingerprint, compare it with :func:`context_fingerprint` of the loaded tower).

    The frozen ``context_tower`` is NOT included: on resume it is re-loaded from the backbone.
    Call from ``TwoTowerModel.sharded_state_dict``.
    """
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    sd = backbone_sharded_state_dict(model.denoiser_tower, f"{prefix}denoiser_tower.", sharded_offsets, metadata)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for name, module in model.time_conditioning_modules().items():
        # (tp_group must be explicit: megatron's default leaves it None, giving every TP rank replica 0)
        part = sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                          tp_group=parallel_state.get_tensor_model_parallel_group())
        if name != "scale_shift_tables":
            # Every pipeline stage holds the whole time network: replicated over PP too (stage 0's
            # copy is written).
            for v in part.values():
                v.replica_id = (pp_rank, *v.replica_id[1:])
        sd.update(part)
    sd[f"{prefix}context_fingerprint"] = ShardedObject(
        f"{prefix}context_fingerprint", context_fingerprint(model.context_tower), (1,), (0,),
        replica_id=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
    return sd


def sharded_tensor_targets(sharded_sd: dict) -> dict:
    """``dict key path -> the live tensor`` of every ``ShardedTensor`` / ``ShardedTensorFactory`` in a
    (nested) sharded state dict; take it BEFORE ``dist_checkpointing.load``, which replaces the entries."""
    out = {}

    def walk(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, (*path, k))
            elif isinstance(v, (ShardedTensor, ShardedTensorFactory)) and isinstance(v.data, torch.Tensor):
                out[(*path, k)] = v.data

    walk(sharded_sd, ())
    return out


@torch.no_grad()
def copy_loaded(targets: dict, loaded: dict) -> int:
    """Copy the tensors ``dist_checkpointing.load`` returned into the live ones of
    :func:`sharded_tensor_targets` (a no-op where it already loaded in place). Returns the count."""
    n = 0
    for path, dst in targets.items():
        v = loaded
        for k in path:
            v = v[k]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"dist checkpoint load: {'/'.join(map(str, path))} came back as {type(v)}")
        if dst.data_ptr() != v.data_ptr():
            dst.copy_(v)
        n += 1
    return n
