"""Load Hugging Face ``NemotronHForCausalLM`` weights into our (sharded) backbone.

Stage: model initialisation (both towers start from one backbone checkpoint). Inputs: a
HF checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded index), or an
in-memory HF model / state dict. Output: this rank's shard of every weight, copied into a
``NemotronHModel`` built for any TP / EP / pipeline layer range.

Both HF layouts are accepted: on disk (``backbone.`` prefix, one tensor per expert:
``backbone.layers.{i}.mixer.experts.{e}.up_proj.weight``) and in memory (``model.`` prefix,
fused 3-D ``mixer.experts.up_proj [E, ffn, h]``). Safetensors are read lazily, slice by
slice, so a rank only reads its own shard of a 60 GB checkpoint.

Key map (``i`` = layer, ``r`` = TP rank's slice; ours on the right):

=====================================  ===============================================
``embeddings.weight`` / ``lm_head``    ``embedding.word_embeddings`` / ``output_layer`` (rows r)
``norm_f.weight``                      ``final_norm.weight``
``layers.i.norm.weight``               ``layers.i.norm.weight``
M ``in_proj [z;x;B;C;dt]``             ``in_proj`` = ``[z_r;x_r;B_r;C_r;dt_r]``
M ``conv1d.weight [x;B;C]``            ``conv1d_weight`` ``[x_r;B_r;C_r]`` (and bias)
M ``A_log, D, dt_bias, norm``          same names, rows r; ``out_proj`` columns r
\\* ``q_proj, k_proj, v_proj``          ``linear_qkv`` per group ``[q_g; k_g; v_g]``, groups r
\\* ``o_proj``                          ``linear_proj`` columns r
E ``gate.weight / e_score_corr..``     ``router.weight / router.expert_bias``
E ``experts.e.{up,down}_proj``         ``experts.local_experts.k.linear_fc{1,2}`` (EP-local)
E/- ``shared_experts`` / ``up,down``   ``linear_fc1`` rows r / ``linear_fc2`` columns r
=====================================  ===============================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from twotower.model.config import BackboneConfig, ConfigError

_FUSED = re.compile(r"^layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)(\.weight)?$")


class CheckpointKeyError(KeyError):
    """The checkpoint's keys or shapes do not match the model; the message lists every problem."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


def safetensors_files(path: Path) -> list[str]:
    """The safetensors files of a HF folder (its index's shards, or ``model.safetensors``)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointKeyError(f"{path}: {index.name} is not a safetensors index (a JSON object with a "
                                     f"weight_map): {type(e).__name__}: {e}") from e
    if (path / "model.safetensors").exists():
        return ["model.safetensors"]
    found = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    raise CheckpointKeyError(f"{path}: no model.safetensors or model.safetensors.index.json"
                             + (f" (found {', '.join(found)} without an index)" if found else ""))


def _open_safetensors(path: Path, name: str):
    from safetensors import safe_open

    try:
        return safe_open(str(path / name), framework="pt")
    except FileNotFoundError as e:
        raise CheckpointKeyError(f"{path}: {name} is missing (listed in model.safetensors.index.json)") from e
    except Exception as e:  # safetensors' SafetensorError: a truncated or damaged header
        raise CheckpointKeyError(f"{path}: {name} is not a readable safetensors file (truncated or damaged? "
                                 f"{type(e).__name__}: {e})") from e


def check_backbone_folder(path: str | Path, model: BackboneConfig) -> None:
    """Cheap checks before anything is built (``twotower-train backbone=``): ``config.json`` (a NemotronH
    or released TwoTower config whose shapes are ``model``'s) and the safetensors headers. Raises
    :class:`CheckpointKeyError` naming the folder and the file or fields at fault."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointKeyError(f"backbone {path}: no such folder (expected a Hugging Face NemotronH checkpoint)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointKeyError(f"{path}: no config.json (expected a Hugging Face NemotronH or TwoTower folder)")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:  # also UnicodeDecodeError
        raise CheckpointKeyError(f"{cfg_file}: not valid JSON ({e})") from e
    hf = hf if isinstance(hf, dict) else {"model_type": f"<a JSON {type(hf).__name__}>"}
    if hf.get("model_type") != "nemotron_h":
        raise CheckpointKeyError(f"{path}: model_type={hf.get('model_type')!r}, architectures="
                                 f"{hf.get('architectures')}; expected a NemotronHForCausalLM backbone or a "
                                 "NemotronHTwoTowerForCausalLM (released TwoTower)")
    try:
        theirs = BackboneConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointKeyError(f"{path}: {e}") from e
    _check_same_shape(model, theirs, str(path))
    for f in safetensors_files(path):
        _open_safetensors(path, f)


class HFWeights:
    """Read-only view of HF NemotronH weights under normalised names (no ``backbone.``/``model.``
    prefix, one entry per expert), with lazy slicing."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], reader: Callable[[str, tuple], torch.Tensor],
                 where: str, files: dict[str, str] | None = None):
        self._shapes, self._reader, self.where = shapes, reader, where
        self._files = files or {}  # name -> the shard file holding it (for error messages)
        self.used: set[str] = set()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_dir(cls, path: str | Path) -> HFWeights:
        """A checkpoint folder, read lazily; a missing, truncated or unreadable safetensors file or
        index raises :class:`CheckpointKeyError` naming the folder and the file."""
        path = Path(path)
        handles, shapes, owner = {}, {}, {}
        for f in safetensors_files(path):
            h = handles[f] = _open_safetensors(path, f)
            for raw in h.keys():  # noqa: SIM118 (safetensors handles are not dicts)
                owner[raw] = f
                shapes[raw] = tuple(h.get_slice(raw).get_shape())

        def read(raw: str, index: tuple) -> torch.Tensor:
            sl = handles[owner[raw]].get_slice(raw)
            return sl[index] if index else sl[:]

        return cls._normalised(shapes, read, str(path), owner)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], where: str = "state dict") -> HFWeights:
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        return cls._normalised(shapes, lambda raw, index: sd[raw][index] if index else sd[raw], where)

    @classmethod
    def _normalised(cls, raw_shapes: dict[str, tuple], read, where: str,
                    raw_files: dict[str, str] | None = None) -> HFWeights:
        shapes: dict[str, tuple] = {}
        readers: dict[str, tuple[str, int | None]] = {}
        for raw, shape in raw_shapes.items():
            name = re.sub(r"^(backbone|model)\.", "", raw)
            m = _FUSED.match(name)
            if m:  # fused [E, out, in] -> virtual per-expert entries
                layer, proj = m.group(1), m.group(2)
                for e in range(shape[0]):
                    virt = f"layers.{layer}.mixer.experts.{e}.{proj}.weight"
                    shapes[virt], readers[virt] = shape[1:], (raw, e)
            else:
                shapes[name], readers[name] = shape, (raw, None)

        def reader(name: str, index: tuple) -> torch.Tensor:
            raw, expert = readers[name]
            return read(raw, ((expert,) + index) if expert is not None else index)

        files = {name: raw_files[raw] for name, (raw, _) in readers.items()} if raw_files else None
        return cls(shapes, reader, where, files)

    @classmethod
    def from_source(cls, source: Any) -> HFWeights:
        """A checkpoint folder, an in-memory HF model (``state_dict()``) or a state dict."""
        if isinstance(source, HFWeights):
            return source
        if isinstance(source, (str, Path)):
            return cls.from_dir(source)
        if hasattr(source, "state_dict"):
            return cls.from_state_dict(source.state_dict(), type(source).__name__)
        return cls.from_state_dict(source)

    def view(self, prefix: str, renames: Mapping[str, str] | None = None) -> HFWeights:
        """The entries under ``prefix`` (stripped), plus ``renames`` (``{our name: name here}``):
        e.g. one tower of a released TwoTower checkpoint as a plain NemotronH checkpoint."""
        names = {n[len(prefix):]: n for n in self._shapes if n.startswith(prefix)}
        names |= {new: old for new, old in (renames or {}).items() if old in self._shapes}
        return HFWeights({k: self._shapes[v] for k, v in names.items()},
                         lambda name, index: self.read(names[name], *index), self.where,
                         {k: self._files[v] for k, v in names.items() if v in self._files})

    # ---------------------------------------------------------------- access
    def names(self) -> set[str]:
        return set(self._shapes)

    def located(self, name: str) -> str:
        """``name`` plus the shard file that holds it, when known."""
        return f"{name} (in {self._files[name]})" if name in self._files else name

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def read(self, name: str, *index) -> torch.Tensor:
        self.used.add(name)
        return self._reader(name, tuple(index))


def load_hf_backbone(model, source: Any, *, ignore_prefixes: tuple[str, ...] = ("mtp.",)) -> None:
    """Copy HF weights into ``model`` (a ``NemotronHModel``), this rank's shard only.

    Args:
        model: built with ``build_backbone`` on the current megatron parallel state.
        source: a HF checkpoint folder, a ``NemotronHForCausalLM``, its ``state_dict()``, or an
            ``HFWeights`` view (no config check).
        ignore_prefixes: HF keys we deliberately do not load (multi-token-prediction heads).
    Raises:
        CheckpointKeyError listing every missing, unexpected and mis-shaped key.
    """
    if isinstance(source, HFWeights):  # already selected (e.g. one tower of a released checkpoint)
        weights = source
    elif isinstance(source, (str, Path)):
        try:
            check = BackboneConfig.from_hf(source)
        except ConfigError as e:  # not a NemotronH folder: name the folder
            raise CheckpointKeyError(f"{source}: {e}") from e
        _check_same_shape(model.backbone, check, str(source))
        weights = HFWeights.from_dir(source)
    else:
        if hasattr(source, "state_dict") and hasattr(source, "config"):
            _check_same_shape(model.backbone, BackboneConfig.from_hf(source.config), type(source).__name__)
            source = source.state_dict()
        weights = HFWeights.from_state_dict(source)
    plan = _plan(model, weights)

    problems, targets = [], dict(model.state_dict(keep_vars=True))
    for ours, (full_shape, hf_names, build) in plan.items():
        for n in hf_names:
            got = weights.shape(n)
            if got is None:
                problems.append(f"missing in checkpoint: {n} (needed for {ours})")
        if any(weights.shape(n) is None for n in hf_names):
            continue
        got_full = tuple(weights.shape(hf_names[0])) if len(hf_names) == 1 else None
        if got_full is not None and full_shape is not None and got_full != tuple(full_shape):
            problems.append(f"shape mismatch: {hf_names[0]} is {got_full}, model expects {tuple(full_shape)}")
            continue
        tensor = build()
        target = targets[ours]
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"shape mismatch: {ours} local shard {tuple(target.shape)} vs converted "
                            f"{tuple(tensor.shape)} from {hf_names}")
            continue
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    not_loaded = sorted(k for k in targets if k not in plan and not _is_runtime_state(k))
    problems += [f"model key not covered by the converter: {k}" for k in not_loaded]
    in_range = {n for n in weights.names() if _layer_in_model(n, model)}
    unexpected = sorted(n for n in in_range - weights.used
                        if not n.startswith(ignore_prefixes) and n not in _deliberately_unused(model))
    problems += [f"unexpected in checkpoint: {weights.located(n)}" for n in unexpected]
    if problems:
        head = f"{weights.where}: {len(problems)} problem(s) loading Hugging Face NemotronH weights"
        raise CheckpointKeyError(head + ":\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------- the plan
def _plan(model, w: HFWeights) -> dict[str, tuple[tuple | None, list[str], Callable[[], torch.Tensor]]]:
    """Our state-dict key -> (full HF shape, HF names used, builder of the local shard)."""
    bb: BackboneConfig = model.backbone
    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    er = parallel_state.get_expert_model_parallel_rank()
    h = bb.hidden_size
    plan: dict[str, tuple] = {}

    def rows(name, n_rows):  # dim-0 shard r of tp
        c = n_rows // tp
        return lambda: w.read(name, slice(r * c, (r + 1) * c))

    def cols(name, n_cols):  # dim-1 shard r of tp
        c = n_cols // tp
        return lambda: w.read(name, slice(None), slice(r * c, (r + 1) * c))

    def parts(name, sizes, extra=()):  # concat of each component's shard r along dim 0
        def build():
            out, start = [], 0
            for size in sizes:
                c = size // tp
                out.append(w.read(name, slice(start + r * c, start + (r + 1) * c), *extra))
                start += size
            return torch.cat(out, 0)
        return build

    if model.pre_process:
        plan["embedding.word_embeddings.weight"] = ((bb.vocab_size, h), ["embeddings.weight"],
                                                    rows("embeddings.weight", bb.vocab_size))
    if model.post_process:
        plan["final_norm.weight"] = ((h,), ["norm_f.weight"], lambda: w.read("norm_f.weight"))
        plan["output_layer.weight"] = ((bb.vocab_size, h), ["lm_head.weight"], rows("lm_head.weight", bb.vocab_size))

    gn = bb.mamba_num_groups * bb.mamba_state_dim
    di, nh = bb.mamba_d_inner, bb.mamba_num_heads
    for j, layer in enumerate(model.layers):
        i = model.layer_offset + j
        src, dst = f"layers.{i}.", f"layers.{j}."
        plan[dst + "norm.weight"] = ((h,), [src + "norm.weight"], (lambda n=src + "norm.weight": w.read(n)))
        m_src, m_dst = src + "mixer.", dst + "mixer."
        if layer.symbol == "M":
            n = m_src + "in_proj.weight"
            plan[m_dst + "in_proj.weight"] = ((2 * di + 2 * gn + nh, h), [n], parts(n, [di, di, gn, gn, nh]))
            n = m_src + "conv1d.weight"
            k = bb.mamba_conv_kernel
            plan[m_dst + "conv1d_weight"] = ((di + 2 * gn, 1, k), [n],
                                             (lambda b=parts(n, [di, gn, gn]): b()[:, 0]))  # noqa: B008 (bind now)
            if bb.mamba_conv_bias:
                n = m_src + "conv1d.bias"
                plan[m_dst + "conv1d_bias"] = ((di + 2 * gn,), [n], parts(n, [di, gn, gn]))
            for p in ("A_log", "D", "dt_bias"):
                plan[m_dst + p] = ((nh,), [m_src + p], rows(m_src + p, nh))
            plan[m_dst + "norm.weight"] = ((di,), [m_src + "norm.weight"], rows(m_src + "norm.weight", di))
            plan[m_dst + "out_proj.weight"] = ((h, di), [m_src + "out_proj.weight"],
                                               cols(m_src + "out_proj.weight", di))
        elif layer.symbol == "*":
            names = [m_src + f"{p}_proj.weight" for p in "qkv"]
            plan[m_dst + "linear_qkv.weight"] = (None, names, _qkv_builder(w, names, bb, r, tp))
            n = m_src + "o_proj.weight"
            plan[m_dst + "linear_proj.weight"] = ((h, bb.num_attention_heads * bb.head_dim), [n],
                                                  cols(n, bb.num_attention_heads * bb.head_dim))
        elif layer.symbol == "-":
            up, down = m_src + "up_proj.weight", m_src + "down_proj.weight"
            plan[m_dst + "linear_fc1.weight"] = ((bb.ffn_hidden_size, h), [up], rows(up, bb.ffn_hidden_size))
            plan[m_dst + "linear_fc2.weight"] = ((h, bb.ffn_hidden_size), [down], cols(down, bb.ffn_hidden_size))
        else:  # MoE
            n = m_src + "gate.weight"
            plan[m_dst + "router.weight"] = ((bb.num_experts, h), [n], (lambda n=n: w.read(n)))
            if bb.moe_router_expert_bias:
                n = m_src + "gate.e_score_correction_bias"
                plan[m_dst + "router.expert_bias"] = ((bb.num_experts,), [n], (lambda n=n: w.read(n)))
            local = bb.num_experts // ep
            for le in range(local):
                e = er * local + le
                for ours, theirs, shape in (("linear_fc1", "up_proj", (bb.moe_ffn_hidden_size, h)),
                                            ("linear_fc2", "down_proj", (h, bb.moe_ffn_hidden_size))):
                    n = f"{m_src}experts.{e}.{theirs}.weight"
                    plan[f"{m_dst}experts.local_experts.{le}.{ours}.weight"] = (shape, [n], (lambda n=n: w.read(n)))
            if bb.moe_shared_expert_intermediate_size:
                f = bb.moe_shared_expert_intermediate_size
                up, down = m_src + "shared_experts.up_proj.weight", m_src + "shared_experts.down_proj.weight"
                plan[m_dst + "shared_experts.linear_fc1.weight"] = ((f, h), [up], rows(up, f))
                plan[m_dst + "shared_experts.linear_fc2.weight"] = ((h, f), [down], cols(down, f))
    return plan


def _qkv_builder(w: HFWeights, names: list[str], bb: BackboneConfig, r: int, tp: int):
    """HF q/k/v -> megatron fused ``[q_g ; k_g ; v_g]`` per query group, groups of TP rank r."""
    d, ng = bb.head_dim, bb.num_query_groups
    hpg = bb.num_attention_heads // ng
    expect = [(bb.num_attention_heads * d, bb.hidden_size), (ng * d, bb.hidden_size), (ng * d, bb.hidden_size)]

    def build():
        for n, e in zip(names, expect):
            if tuple(w.shape(n)) != e:
                raise CheckpointKeyError(f"{w.where}: shape mismatch: {n} is {tuple(w.shape(n))}, model expects {e}")
        g0, g1 = r * ng // tp, (r + 1) * ng // tp
        q = w.read(names[0], slice(g0 * hpg * d, g1 * hpg * d)).reshape(g1 - g0, hpg * d, -1)
        k = w.read(names[1], slice(g0 * d, g1 * d)).reshape(g1 - g0, d, -1)
        v = w.read(names[2], slice(g0 * d, g1 * d)).reshape(g1 - g0, d, -1)
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])

    return build


def _is_runtime_state(key: str) -> bool:
    """Buffers that are not weights (megatron extra state, router token counters)."""
    return key.endswith(("_extra_state", "local_tokens_per_expert"))


def _layer_in_model(name: str, model) -> bool:
    m = re.match(r"^layers\.(\d+)\.", name)
    if not m:
        return (name.startswith("embeddings") and model.pre_process) or (
            name.split(".")[0] in ("norm_f", "lm_head") and model.post_process) or not name.startswith(
            ("embeddings", "norm_f", "lm_head"))
    i = int(m.group(1)) - model.layer_offset
    return 0 <= i < len(model.layers)


def _deliberately_unused(model) -> set[str]:
    """Experts that live on other EP ranks are in range but belong to someone else."""
    bb = model.backbone
    ep = parallel_state.get_expert_model_parallel_world_size()
    er = parallel_state.get_expert_model_parallel_rank()
    local = bb.num_experts // ep
    out = set()
    for j, layer in enumerate(model.layers):
        if layer.symbol != "E":
            continue
        i = model.layer_offset + j
        for e in range(bb.num_experts):
            if not er * local <= e < (er + 1) * local:
                out |= {f"layers.{i}.mixer.experts.{e}.up_proj.weight", f"layers.{i}.mixer.experts.{e}.down_proj.weight"}
    return out


def _check_same_shape(ours: BackboneConfig, theirs: BackboneConfig, where: str) -> None:
    fields = ("pattern", "vocab_size", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
              "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_conv_kernel",
              "ffn_hidden_size", "num_experts", "moe_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size")
    diff = [f"{f}: model {getattr(ours, f)!r} vs checkpoint {getattr(theirs, f)!r}"
            for f in fields if getattr(ours, f) != getattr(theirs, f) and (f != "ffn_hidden_size" or "-" in ours.pattern)]
    if diff:
        raise CheckpointKeyError(f"{where}: the checkpoint's config (config.json) differs from the model's; "
                                 "choose the matching model config (model=...) or another backbone:\n  "
                                 + "\n  ".join(diff))
