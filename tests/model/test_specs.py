"""The spec providers: the local one builds here; the Transformer Engine one (GPU hosts, tests/gpu)
keeps checkpoint / HF names backend-independent through the layer's state-dict name mapping."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from twotower.model import layers


def test_te_names_map_to_the_local_names_and_back():
    """TE keeps the M/* pre-norm inside the fused linear and the experts as grouped weights; a state
    dict in TE names is saved under the local names (and TE's FP8 extra state dropped), and local
    names load back into TE names."""
    te_sd = {
        "layers.0.mixer.in_proj.layer_norm_weight": torch.ones(4),
        "layers.0.mixer.in_proj.weight": torch.zeros(8, 4),
        "layers.0.mixer.in_proj._extra_state": None,
        "layers.2.mixer.experts.linear_fc1.weight0": torch.full((6, 4), 0.0),
        "layers.2.mixer.experts.linear_fc1.weight1": torch.full((6, 4), 1.0),
        "layers.2.mixer.experts.linear_fc2.weight1": torch.full((4, 6), 2.0),
    }
    saved = dict(te_sd)
    layers._to_canonical_names(None, saved, "layers.0.", None)
    layers._to_canonical_names(None, saved, "layers.2.", None)
    assert set(saved) == {"layers.0.norm.weight", "layers.0.mixer.in_proj.weight",
                          "layers.2.mixer.experts.local_experts.0.linear_fc1.weight",
                          "layers.2.mixer.experts.local_experts.1.linear_fc1.weight",
                          "layers.2.mixer.experts.local_experts.1.linear_fc2.weight"}
    assert saved["layers.2.mixer.experts.local_experts.1.linear_fc2.weight"][0, 0] == 2.0
    mamba = SimpleNamespace(fused_norm=True, symbol="M", mixer=None)
    moe = SimpleNamespace(fused_norm=False, symbol="E", mixer=SimpleNamespace(experts=SimpleNamespace()))
    loaded = dict(saved)
    layers._from_canonical_names(mamba, loaded, "layers.0.", None, True, [], [], [])
    layers._from_canonical_names(moe, loaded, "layers.2.", None, True, [], [], [])
    assert loaded.keys() == {k for k in te_sd if not k.endswith("_extra_state")}
    # a local (SequentialMLP) layer is left alone
    local = dict(saved)
    moe_local = SimpleNamespace(fused_norm=False, symbol="E",
                                mixer=SimpleNamespace(experts=SimpleNamespace(local_experts=[])))
    layers._from_canonical_names(moe_local, local, "layers.2.", None, True, [], [], [])
    assert local == saved
    keys = SimpleNamespace(missing_keys=["a._extra_state", "b.weight"])
    layers._ignore_missing_extra_state(None, keys)
    assert keys.missing_keys == ["b.weight"]
