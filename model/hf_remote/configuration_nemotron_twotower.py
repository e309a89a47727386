"""Configuration of the released Nemotron-Labs-TwoTower model (Hugging Face remote code).

Shipped as data: the exporter copies this file next to an exported checkpoint's ``config.json``
(with ``modeling_nemotron_twotower.py``) and writes :data:`AUTO_MAP` into that ``config.json``, so
``AutoConfig/AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` resolve to the
classes of these two files. Imports only ``transformers`` (never the training package).

The config is a stock NemotronH config (release spec §2): the TwoTower model reads no field of its
own. ``model_type`` stays ``"nemotron_h"`` as in the release; with ``trust_remote_code=True`` the
``auto_map`` entries win over transformers' native ``nemotron_h`` classes (without it, transformers
would build its own single-tower NemotronH, which cannot load a TwoTower checkpoint).
"""

from __future__ import annotations

from transformers import PretrainedConfig

#: What the exporter writes into ``config.json["auto_map"]``.
AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_twotower.NemotronHTwoTowerConfig",
    "AutoModelForCausalLM": "modeling_nemotron_twotower.NemotronHTwoTowerForCausalLM",
}

#: pattern character -> layer type (the names NVIDIA's NemotronH remote code uses)
PATTERN_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
#: layer-type names found in ``layers_block_type`` lists (ours and transformers 5.x's) -> pattern character
_TYPE_CHARS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E",
               "mlp": "-"}


class NemotronHTwoTowerConfig(PretrainedConfig):
    """A NemotronH config; layer types come from ``hybrid_override_pattern`` (one of ``M * E -`` per layer).

    ``layers_block_type`` is accepted as an input list (transformers 5.x writes NemotronH configs that
    way) but never stored: it is a property derived from the pattern, and ``num_hidden_layers`` is the
    pattern's length.
    """

    model_type = "nemotron_h"

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 2688,
        hybrid_override_pattern: str | None = None,
        layers_block_type: list[str] | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        head_dim: int = 128,
        attention_bias: bool = False,
        mamba_num_heads: int = 64,
        mamba_head_dim: int = 64,
        n_groups: int = 8,
        ssm_state_size: int = 128,
        conv_kernel: int = 4,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        chunk_size: int = 128,
        mamba_hidden_act: str = "silu",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_limit: tuple[float, float] | list[float] = (0.0, float("inf")),
        n_routed_experts: int = 128,
        num_experts_per_tok: int = 6,
        n_shared_experts: int = 1,
        moe_intermediate_size: int = 1856,
        moe_shared_expert_intermediate_size: int = 3712,
        routed_scaling_factor: float = 2.5,
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        intermediate_size: int = 1856,
        mlp_hidden_act: str = "relu2",
        mlp_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = False,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 262144,
        num_logits_to_keep: int = 1,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if layers_block_type is not None:
            from_list = "".join(_TYPE_CHARS[t] for t in layers_block_type)
            if hybrid_override_pattern is not None and hybrid_override_pattern != from_list:
                raise ValueError(f"hybrid_override_pattern {hybrid_override_pattern!r} disagrees with "
                                 f"layers_block_type {layers_block_type}")
            hybrid_override_pattern = from_list
        if hybrid_override_pattern is None:
            hybrid_override_pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # the release's
        if set(hybrid_override_pattern) - set(PATTERN_TYPES):
            raise ValueError(f"hybrid_override_pattern {hybrid_override_pattern!r}: "
                             "the layer types are M, *, E and -")
        if num_hidden_layers is not None and num_hidden_layers != len(hybrid_override_pattern):
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but the pattern has "
                             f"{len(hybrid_override_pattern)} layers")
        if tie_word_embeddings:
            raise ValueError("the TwoTower heads are not tied to the embeddings (tie_word_embeddings=False)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.hybrid_override_pattern = hybrid_override_pattern
        self.num_hidden_layers = len(hybrid_override_pattern)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.attention_bias = attention_bias
        self.mamba_num_heads = mamba_num_heads
        self.mamba_head_dim = mamba_head_dim
        self.n_groups = n_groups
        self.ssm_state_size = ssm_state_size
        self.conv_kernel = conv_kernel
        self.use_conv_bias = use_conv_bias
        self.use_bias = use_bias
        self.chunk_size = chunk_size
        self.mamba_hidden_act = mamba_hidden_act
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_limit = tuple(float(v) for v in time_step_limit)
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.n_group = n_group
        self.topk_group = topk_group
        self.intermediate_size = intermediate_size
        self.mlp_hidden_act = mlp_hidden_act
        self.mlp_bias = mlp_bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.num_logits_to_keep = num_logits_to_keep
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def layers_block_type(self) -> list[str]:
        """Per layer ``"mamba" | "attention" | "moe" | "mlp"``, derived from ``hybrid_override_pattern``."""
        return [PATTERN_TYPES[c] for c in self.hybrid_override_pattern]
