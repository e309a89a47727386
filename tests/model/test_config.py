"""Config validation (clear errors before any weight exists) and the 30B-A3B shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from twotower.model.config import BackboneConfig, ConfigError, ParallelConfig, backbone_config_from_dict

CONF = Path(__file__).parents[2] / "conf" / "model"


def nano() -> BackboneConfig:
    return backbone_config_from_dict(yaml.safe_load((CONF / "nemotron3_nano_30b_a3b.yaml").read_text()))


def test_nano_parameter_counts_from_formula():
    cfg = nano()
    assert cfg.layer_counts() == {"mamba": 23, "attention": 6, "moe": 23, "mlp": 0}
    counts = cfg.param_counts()
    assert round(counts["total"] / 1e9, 2) == 31.58
    assert round(counts["active"] / 1e9, 2) == 3.58


def test_nano_built_on_meta_device_has_31p58b_parameters(megatron_world1):
    from twotower.model.backbone import build_backbone

    cfg = nano()
    model = build_backbone(cfg, ParallelConfig(), device="meta", perform_initialization=False)
    total = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias"))
    assert total + buffers == cfg.param_counts()["total"]
    assert round(total / 1e9, 2) == 31.58
    expert = sum(p.numel() for n, p in model.named_parameters() if ".local_experts." in n)
    active = total + buffers - expert + expert * cfg.moe_topk // cfg.num_experts
    assert round(active / 1e9, 2) == 3.58


@pytest.mark.parametrize("kwargs,field", [
    (dict(pattern="M*X"), "model.pattern"),
    (dict(num_attention_heads=6, num_query_groups=4), "model.num_query_groups"),
    (dict(mamba_num_heads=6, mamba_num_groups=4), "model.mamba_num_groups"),
    (dict(moe_topk=9, num_experts=8), "model.moe_topk"),
    (dict(hidden_size=0), "model.hidden_size"),
])
def test_bad_model_fields_are_named(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        BackboneConfig(**kwargs)


@pytest.mark.parametrize("parallel,field", [
    (ParallelConfig(tp=3), "parallel.tp=3 does not divide model.vocab_size"),
    (ParallelConfig(tp=4, sequence_parallel=True), "parallel.tp=4 does not divide model.num_query_groups"),
    (ParallelConfig(ep=3), "parallel.ep=3 does not divide model.num_experts"),
    (ParallelConfig(tp=2), "requires parallel.sequence_parallel=true"),
    (ParallelConfig(pp=60), "parallel.pp=60 exceeds"),
])
def test_impossible_layouts_are_refused(parallel, field):
    cfg = BackboneConfig(vocab_size=256, num_attention_heads=8, num_query_groups=2, num_experts=4,
                         mamba_num_heads=8, mamba_num_groups=4)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("=", "=")):
        cfg.validate_parallel(parallel)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown key.*hidden_sise"):
        backbone_config_from_dict({"hidden_sise": 3})


def test_world_size_must_fit_layout():
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        ParallelConfig(tp=4).data_parallel_size(6)
    assert ParallelConfig(tp=2).data_parallel_size(8) == 4


def test_other_architecture_refused_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="model_type='llama'.*only NemotronH"):
        BackboneConfig.from_hf(tmp_path)


def test_hf_round_trip_of_config():
    from transformers import NemotronHConfig

    cfg = nano()
    back = BackboneConfig.from_hf(NemotronHConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                                     if k not in ("model_type", "architectures")}))
    for f in ("pattern", "hidden_size", "num_experts", "moe_topk", "moe_routed_scaling_factor", "mamba_num_heads"):
        assert getattr(back, f) == getattr(cfg, f), f


# -- backends: chosen once, unknown values refused at config time, unavailable ones on the host ---------
@pytest.mark.parametrize("key,value", [("transformer_impl", "te"), ("attention_backend", "flash"),
                                       ("ssm_backend", "triton")])
def test_unknown_backend_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"parallel\.{key}='{value}': use one of auto, "):
        ParallelConfig(**{key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host may have the GPU backends")
@pytest.mark.parametrize("key,value,needs", [
    ("transformer_impl", "transformer_engine", "needs CUDA and transformer_engine"),
    ("ssm_backend", "mamba_ssm", "needs CUDA and mamba_ssm \\+ causal_conv1d"),
])
def test_unavailable_backend_is_refused_with_what_is_installed(key, value, needs):
    par = ParallelConfig(**{key: value})  # a valid value: accepted where the job is only composed
    with pytest.raises(ConfigError, match=rf"parallel\.{key}='{value}' {needs}; installed here: CUDA no, "
                                          r"transformer_engine no, mamba_ssm no, causal_conv1d no"):
        par.check_host()
    ParallelConfig(attention_backend="flex").check_host()  # FlexAttention runs on CPU (eager)


def test_auto_resolves_once_to_what_this_host_has(megatron_world1):
    from twotower.model import backends
    from twotower.model.specs import get_hybrid_layer_specs

    cuda = torch.cuda.is_available()
    impl = backends.resolve("transformer_impl", "auto")
    assert impl == ("transformer_engine" if cuda and backends.has_module("transformer_engine") else "local")
    assert backends.resolve("attention_backend", "auto") == ("flex" if cuda else "sdpa")
    assert backends.resolve("ssm_backend", "torch") == "torch"
    specs = get_hybrid_layer_specs(BackboneConfig(), ParallelConfig())
    assert specs.transformer_impl == impl
    assert specs.fused_norm_symbols == ("M*" if impl == "transformer_engine" else "")
    # mixers receive their linear layers from the spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if impl == "local":
        assert specs.mamba.submodules.in_proj is ColumnParallelLinear
        assert specs.attention.submodules.linear_proj is RowParallelLinear
