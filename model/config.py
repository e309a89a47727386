"""Configuration schema of the Nemotron-H backbone and of the parallel layout.

Stage: model construction. Inputs: values from Hydra YAML (``conf/model/*.yaml``,
``conf/parallel/*.yaml``) or from a Hugging Face ``config.json``. Outputs: a validated
``BackboneConfig`` / ``ParallelConfig`` pair, and from them the megatron-core
``TransformerConfig`` every megatron module is built with.

All cross-field rules are checked here, before any process group or weight exists, and
every error names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The hybrid pattern alphabet (megatron's ``hybrid_override_pattern``; HF ``layers_block_type``).
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
#: HF ``layers_block_type`` names per symbol (``mamba`` is the legacy HF name of ``linear_attention``).
HF_LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
_HF_TO_SYMBOL = {v: k for k, v in HF_LAYER_TYPES.items()} | {"mamba": "M", "attention": "*"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class BackboneConfig:
    """Shape of a Nemotron-H hybrid (Mamba-2 / attention / MoE / MLP) language model.

    Defaults are a tiny model; ``conf/model/nemotron3_nano_30b_a3b.yaml`` holds the real one.
    """

    pattern: str = "M*EM"
    """Layer pattern, one symbol per layer: ``M`` Mamba-2, ``*`` attention, ``E`` MoE, ``-`` dense MLP."""
    vocab_size: int = 260
    """Vocabulary size (untied input embedding and LM head)."""
    hidden_size: int = 64
    """Residual stream width."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (all pre-norms, the final norm and the Mamba gated norm)."""

    # --- attention (GQA, no positional embedding: Nemotron-H relies on the Mamba layers for order)
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups); must divide ``num_attention_heads``."""
    head_dim: int = 16
    """Channels per attention head (``kv_channels`` in megatron)."""

    # --- Mamba-2
    mamba_num_heads: int = 4
    """SSM heads (``d_inner = mamba_num_heads * mamba_head_dim``)."""
    mamba_head_dim: int = 16
    """Channels per SSM head."""
    mamba_num_groups: int = 2
    """B/C groups (like GQA for the SSM); must divide ``mamba_num_heads``."""
    mamba_state_dim: int = 16
    """SSM state size N."""
    mamba_conv_kernel: int = 4
    """Depthwise causal conv width."""
    mamba_chunk_size: int = 128
    """SSD chunk length (a speed knob: results do not depend on it)."""
    mamba_conv_bias: bool = True
    """Whether the depthwise conv has a bias (Nemotron-H: yes)."""
    mamba_dt_min: float = 0.0
    """Lower clamp of ``softplus(dt + dt_bias)`` in the causal (context / AR) scans: the HF config's
    ``time_step_limit[0]`` (the release: none). The denoiser's block scan never clamps."""
    mamba_dt_max: float = float("inf")
    """Upper clamp of the discretisation step (``time_step_limit[1]``)."""

    # --- dense MLP and MoE (squared-ReLU, not gated, no biases)
    ffn_hidden_size: int = 128
    """Intermediate size of dense ``-`` layers."""
    num_experts: int = 4
    """Routed experts per MoE layer."""
    moe_topk: int = 2
    """Experts per token."""
    moe_ffn_hidden_size: int = 32
    """Intermediate size of one routed expert."""
    moe_shared_expert_intermediate_size: int | None = 48
    """Intermediate size of the shared expert (``None``: no shared expert)."""
    moe_routed_scaling_factor: float = 1.0
    """Multiplies the normalised top-k weights (Nemotron-3-Nano: 2.5)."""
    moe_router_dtype: str = "fp32"
    """Precision of router logits and top-k; the release recommends fp64 to keep routing stable."""
    moe_router_expert_bias: bool = True
    """Sigmoid router with aux-loss-free score-correction bias (``e_score_correction_bias``)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the aux-loss-free bias update (only for trained towers)."""

    init_method_std: float = 0.02
    """Std of normal weight init (only for weights not loaded from a checkpoint)."""

    def __post_init__(self) -> None:
        self.pattern = str(self.pattern)
        bad = sorted({c for c in self.pattern if c not in LAYER_SYMBOLS})
        if not self.pattern or bad:
            raise ConfigError(
                f"model.pattern={self.pattern!r}: unknown layer symbol(s) {bad}; "
                f"use only {', '.join(f'{k!r} ({v})' for k, v in LAYER_SYMBOLS.items())}"
            )
        _positive(self, "vocab_size", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                  "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
                  "mamba_conv_kernel", "mamba_chunk_size", "ffn_hidden_size", "num_experts", "moe_topk",
                  "moe_ffn_hidden_size")
        _divides(self, "num_query_groups", self.num_query_groups, "num_attention_heads", self.num_attention_heads)
        _divides(self, "mamba_num_groups", self.mamba_num_groups, "mamba_num_heads", self.mamba_num_heads)
        if self.moe_topk > self.num_experts:
            raise ConfigError(f"model.moe_topk={self.moe_topk} exceeds model.num_experts={self.num_experts}")
        if self.moe_router_dtype not in ("fp32", "fp64"):
            raise ConfigError(f"model.moe_router_dtype={self.moe_router_dtype!r}: use 'fp32' or 'fp64'")
        if not 0 <= self.mamba_dt_min <= self.mamba_dt_max:
            raise ConfigError("model.mamba_dt_min must satisfy 0 <= mamba_dt_min <= mamba_dt_max")

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels through the causal conv: x, B and C."""
        return self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim

    def layer_counts(self) -> dict[str, int]:
        return {name: self.pattern.count(sym) for sym, name in LAYER_SYMBOLS.items()}

    def param_counts(self) -> dict[str, int]:
        """Total and per-token-active parameter counts (no padding, no TP duplication)."""
        h = self.hidden_size
        mamba = (h * (2 * self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim
                      + self.mamba_num_heads)
                 + self.mamba_conv_dim * (self.mamba_conv_kernel + int(self.mamba_conv_bias))
                 + 3 * self.mamba_num_heads + self.mamba_d_inner + self.mamba_d_inner * h)
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        mlp = 2 * h * self.ffn_hidden_size
        expert = 2 * h * self.moe_ffn_hidden_size
        shared = 2 * h * (self.moe_shared_expert_intermediate_size or 0)
        router = self.num_experts * h + (self.num_experts if self.moe_router_expert_bias else 0)
        per_layer = {"M": mamba, "*": attn, "-": mlp, "E": self.num_experts * expert + shared + router}
        active_layer = dict(per_layer, E=self.moe_topk * expert + shared + router)
        norms = h * (self.num_layers + 1)
        embed = 2 * self.vocab_size * h
        total = embed + norms + sum(per_layer[c] for c in self.pattern)
        active = embed + norms + sum(active_layer[c] for c in self.pattern)
        return {"total": total, "active": active}

    def validate_parallel(self, parallel: ParallelConfig) -> None:
        """Check that this model can be sharded with ``parallel``; raise ConfigError naming the field."""
        tp, ep = parallel.tp, parallel.ep
        counts = self.layer_counts()
        _divides(parallel, "tp", tp, "model.vocab_size", self.vocab_size, prefix="parallel")
        if counts["attention"]:
            _divides(parallel, "tp", tp, "model.num_attention_heads", self.num_attention_heads, prefix="parallel")
            _divides(parallel, "tp", tp, "model.num_query_groups", self.num_query_groups, prefix="parallel")
        if counts["mamba"]:
            _divides(parallel, "tp", tp, "model.mamba_num_heads", self.mamba_num_heads, prefix="parallel")
            _divides(parallel, "tp", tp, "model.mamba_num_groups", self.mamba_num_groups, prefix="parallel")
        if counts["mlp"]:
            _divides(parallel, "tp", tp, "model.ffn_hidden_size", self.ffn_hidden_size, prefix="parallel")
        if counts["moe"]:
            _divides(parallel, "ep", ep, "model.num_experts", self.num_experts, prefix="parallel")
            if self.moe_shared_expert_intermediate_size:
                _divides(parallel, "tp", tp, "model.moe_shared_expert_intermediate_size",
                         self.moe_shared_expert_intermediate_size, prefix="parallel")
            if tp > 1 and not parallel.sequence_parallel:
                raise ConfigError(
                    f"parallel.tp={tp} with MoE layers requires parallel.sequence_parallel=true "
                    "(megatron-core's MoE token dispatchers expect sequence-parallel input under TP)"
                )
        if parallel.pp > self.num_layers:
            raise ConfigError(f"parallel.pp={parallel.pp} exceeds the {self.num_layers} layers of model.pattern")

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> BackboneConfig:
        """Build from a Hugging Face ``NemotronHConfig`` (dict, config object, ``config.json`` or its folder)."""
        if isinstance(hf, (str, Path)):
            path = Path(hf)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise ConfigError(f"{path}: no config.json (expected a Hugging Face NemotronH checkpoint)")
            hf = json.loads(path.read_text())
        elif not isinstance(hf, dict):
            hf = hf.to_dict()
        where = hf.get("_name_or_path") or "the Hugging Face config"
        if hf.get("model_type") != "nemotron_h":
            raise ConfigError(
                f"{where}: model_type={hf.get('model_type')!r}, architectures={hf.get('architectures')}; "
                "twotower converts only NemotronH (model_type 'nemotron_h') checkpoints"
            )
        types = hf.get("layers_block_type") or hf.get("layer_types")
        pattern = hf.get("hybrid_override_pattern") or "".join(_HF_TO_SYMBOL.get(t, "?") for t in types)
        if hf.get("moe_latent_size"):
            raise ConfigError(f"{where}: moe_latent_size={hf['moe_latent_size']} (latent MoE) is not supported")
        if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
            raise ConfigError(f"{where}: grouped routing (n_group/topk_group != 1) is not supported")
        if (hf.get("n_shared_experts") or 0) > 1:
            raise ConfigError(f"{where}: n_shared_experts={hf['n_shared_experts']}; only 0 or 1 is supported")
        topk = hf.get("num_experts_per_tok", 2)
        if not hf.get("norm_topk_prob", True) and topk > 1 or hf.get("norm_topk_prob", True) and topk == 1:
            raise ConfigError(f"{where}: norm_topk_prob={hf.get('norm_topk_prob')} with top-{topk} routing "
                              "differs from megatron's sigmoid router (normalises exactly when top-k > 1)")
        for key in ("use_bias", "mlp_bias", "attention_bias"):
            if hf.get(key):
                raise ConfigError(f"{where}: {key}=true; Nemotron-H layers have no biases and neither do ours")
        if hf.get("mlp_hidden_act", "relu2") != "relu2" or hf.get("mamba_hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: activations must be mlp_hidden_act='relu2', mamba_hidden_act='silu'")
        dt_limit = hf.get("time_step_limit") or (0.0, float("inf"))
        lo, hi = dt_limit[0], dt_limit[1]
        hi = float("inf") if isinstance(hi, dict) or hi is None else float(hi)
        return cls(
            pattern=pattern,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            mamba_num_heads=hf["mamba_num_heads"],
            mamba_head_dim=hf["mamba_head_dim"],
            mamba_num_groups=hf.get("n_groups", 8),
            mamba_state_dim=hf.get("ssm_state_size", 128),
            mamba_conv_kernel=hf.get("conv_kernel", 4),
            mamba_chunk_size=hf.get("chunk_size", 128),
            mamba_conv_bias=hf.get("use_conv_bias", True),
            # The release's remote code clamps dt by time_step_limit (absent: no clamp).
            # transformers' in-library NemotronH clamps at time_step_min whatever the limit says:
            # tests that compare with it set time_step_limit = (time_step_min, inf).
            mamba_dt_min=float(lo or 0.0),
            mamba_dt_max=hi,
            ffn_hidden_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            num_experts=hf.get("n_routed_experts", 8),
            moe_topk=topk,
            moe_ffn_hidden_size=hf.get("moe_intermediate_size", 4 * hf["hidden_size"]),
            moe_shared_expert_intermediate_size=(hf.get("moe_shared_expert_intermediate_size")
                                                 if hf.get("n_shared_experts", 1) else None),
            moe_routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            moe_router_expert_bias=True,
            init_method_std=hf.get("initializer_range", 0.02),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The matching Hugging Face ``NemotronHConfig`` fields (for export and for tests)."""
        return {
            "model_type": "nemotron_h",
            "architectures": ["NemotronHForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "layers_block_type": [HF_LAYER_TYPES[c] for c in self.pattern],
            "layer_norm_epsilon": self.norm_eps,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "n_groups": self.mamba_num_groups,
            "ssm_state_size": self.mamba_state_dim,
            "conv_kernel": self.mamba_conv_kernel,
            "chunk_size": self.mamba_chunk_size,
            "use_conv_bias": self.mamba_conv_bias,
            **({"time_step_limit": [self.mamba_dt_min, self.mamba_dt_max]}
               if (self.mamba_dt_min, self.mamba_dt_max) != (0.0, float("inf")) else {}),
            "intermediate_size": self.ffn_hidden_size,
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.moe_topk,
            "moe_intermediate_size": self.moe_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size or 1,
            "n_shared_experts": 1 if self.moe_shared_expert_intermediate_size else 0,
            "routed_scaling_factor": self.moe_routed_scaling_factor,
            "norm_topk_prob": self.moe_topk > 1,
            "mlp_hidden_act": "relu2",
            "tie_word_embeddings": False,
            "initializer_range": self.init_method_std,
        }


@dataclass
class ParallelConfig:
    """How the model is sharded. World size = tp * pp * dp (experts: ep divides dp * tp)."""

    tp: int = 1
    """Tensor-parallel size (attention heads, Mamba heads/groups, MLP columns, vocab)."""
    ep: int = 1
    """Expert-parallel size (routed experts are split across ep ranks)."""
    pp: int = 1
    """Pipeline-parallel size (each stage holds the same layer range of both towers)."""
    sequence_parallel: bool = False
    """Shard norms/residuals along the sequence under TP (required with MoE when tp > 1)."""
    moe_token_dispatcher: str = "alltoall"
    """megatron-core MoE token dispatcher."""
    transformer_impl: str = "auto"
    """Linear/norm/expert modules: ``local`` (megatron's tensor-parallel layers) or
    ``transformer_engine`` (TE linears with the M/* pre-norm fused, grouped-GEMM experts);
    ``auto``: TE when it imports and CUDA is present (``model/backends.py``)."""
    attention_backend: str = "auto"
    """Core attention: FlexAttention block masks or dense-mask SDPA; ``auto`` picks flex on CUDA."""
    ssm_backend: str = "auto"
    """Mamba-2 scan and conv kernels: ``mamba_ssm`` (mamba-ssm + causal-conv1d, CUDA) or ``torch``;
    ``auto``: the kernels on CUDA when installed, per call where they support the inputs."""
    fusions: bool = True
    """megatron's fused kernels on CUDA (TE weight-gradient accumulation into main_grad, fused MoE
    permute); always off on CPU."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce(-scatter) with the backward (CUDA only)."""
    overlap_param_gather: bool = True
    """Overlap the distributed optimizer's parameter all-gather with the next forward (CUDA only;
    needs optim.distributed_optimizer)."""
    timeout_s: int = 1800
    """Collective timeout in seconds (NCCL's 600 s default is short at 512 ranks: the first collective
    waits for the slowest rank's start-up and a checkpoint save)."""

    def __post_init__(self) -> None:
        from twotower.model.backends import check_choice

        _positive(self, "tp", "ep", "pp", "timeout_s", prefix="parallel")
        for name in ("transformer_impl", "attention_backend", "ssm_backend"):
            why = check_choice(name, getattr(self, name))
            if why:
                raise ConfigError(why)
        if self.moe_token_dispatcher not in ("allgather", "alltoall"):
            raise ConfigError(f"parallel.moe_token_dispatcher={self.moe_token_dispatcher!r}: "
                              "use 'allgather' or 'alltoall'")

    def check_host(self) -> None:
        """Refuse backends this host cannot run (e.g. ``transformer_engine`` without TE), naming the
        key and what is installed. Called where the training runs, not where a job is submitted."""
        from twotower.model.backends import check_available

        check_available(self.transformer_impl, self.attention_backend, self.ssm_backend)

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
                              f"{self.tp} * {self.pp}; launch a multiple of {model_parallel} ranks")
        dp = world_size // model_parallel
        if (dp * self.tp) % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide data-parallel x tensor-parallel size "
                              f"{dp} x {self.tp} (world size {world_size})")
        return dp


def backbone_config_from_dict(d: dict[str, Any]) -> BackboneConfig:
    """Build from a mapping (e.g. a Hydra node), rejecting unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(d) - names - {"_target_", "name"})
    if unknown:
        raise ConfigError(f"model: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return BackboneConfig(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------- helpers
def _positive(cfg: Any, *names: str, prefix: str = "model") -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}.{name}={value!r} must be a positive integer")


def _divides(cfg: Any, name: str, value: int, of_name: str, of_value: int, prefix: str = "model") -> None:
    if of_value % value:
        hint = math.gcd(value, of_value)
        raise ConfigError(
            f"{prefix}.{name}={value} does not divide {of_name}={of_value}; "
            f"choose a divisor of {of_value} (e.g. {hint})"
        )


__all__ = [
    "HF_LAYER_TYPES",
    "LAYER_SYMBOLS",
    "BackboneConfig",
    "ConfigError",
    "ParallelConfig",
    "backbone_config_from_dict",
]
