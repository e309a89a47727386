"""NVIDIA's released Nemotron-Labs-TwoTower block-diffusion LM as Hugging Face remote code.

Shipped as data: the exporter copies this file and ``configuration_nemotron_twotower.py`` next to an
exported checkpoint, so ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` gives
:class:`NemotronHTwoTowerForCausalLM` with plain transformers. It is our own implementation that
reproduces the released model's checkpoint layout and inference semantics (``release.md`` §2-§9):

* two NemotronH towers (``context_tower``: frozen AR backbone + ``context_lm_head``; ``denoiser_tower``
  + ``lm_head``) and adaLN-single time conditioning (``t_embedder``, ``t_block``, ``scale_shift_tables``);
* ``forward``/``generate``: the context tower as a plain causal LM;
* ``generate_ar``, ``generate_mock_ar`` and ``generate_mask_diffusion``: the release's three decoders,
  with its two-pass prefill and its token-by-token / block-wise cache extensions.

Imports only torch and transformers (plus ``mamba_ssm``/``causal_conv1d`` kernels on CUDA when
installed); every op has an exact pure-PyTorch path, which is what runs on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # loaded by transformers as a package module; or imported directly from the folder
    from .configuration_nemotron_twotower import NemotronHTwoTowerConfig
except ImportError:
    from configuration_nemotron_twotower import NemotronHTwoTowerConfig

try:  # CUDA kernels (optional): the scans and the causal conv fall back to PyTorch without them
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = selective_state_update = None
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None

# transformers >= 5 names the output's cache field ``cache``, 4.x ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_FREQ_DIM = 256  # adaLN sinusoid size (§6)


# ----------------------------------------------------------------------------------------------------
# Caches (§8)
# ----------------------------------------------------------------------------------------------------
@dataclass
class LayerState:
    """One layer's cache. Mamba: ``conv`` [B, conv_dim, K] = the last K raw (pre-conv) xBC inputs, newest
    last, and ``ssm`` [B, nh, p, N] in fp32. Attention: ``key``/``value`` [B, nkv, T, hd]. MoE/MLP: empty."""

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def to(self, device) -> LayerState:
        moved = (None if x is None else x.to(device) for x in (self.conv, self.ssm, self.key, self.value))
        return LayerState(*moved)


class HybridCache:
    """All layers' states of one tower after ``length`` tokens. Immutable: a forward returns a new cache
    (so keeping an old one around is a free snapshot). Also the ``past_key_values`` of ``forward``."""

    def __init__(self, layers: list[LayerState], length: int):
        self.layers, self.length = layers, length

    @classmethod
    def empty(cls, config, batch: int, device, dtype) -> HybridCache:
        """States before any token: zero conv/SSM states, zero-length K/V."""
        nh, p, n, hd = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.head_dim
        conv_dim = nh * p + 2 * config.n_groups * n
        layers = []
        for kind in config.layers_block_type:
            if kind == "mamba":
                conv = torch.zeros(batch, conv_dim, config.conv_kernel, device=device, dtype=dtype)
                ssm = torch.zeros(batch, nh, p, n, device=device, dtype=torch.float32)
                layers.append(LayerState(conv=conv, ssm=ssm))
            elif kind == "attention":
                kv = torch.zeros(batch, config.num_key_value_heads, 0, hd, device=device, dtype=dtype)
                layers.append(LayerState(key=kv, value=kv))
            else:
                layers.append(LayerState())
        return cls(layers, 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def to(self, device) -> HybridCache:
        return HybridCache([s.to(device) for s in self.layers], self.length)


@dataclass
class ContextState:
    """The context tower's decoding state: ``cache`` after the last committed token ("S-1" Mamba states,
    full K/V), ``previous`` = the cache before the last extension step (after a token-by-token step:
    Mamba states "S-2" and K/V[:-1], mock-AR's denoiser cache), ``logits`` [B, V] fp32 = the context
    head at the last position (None after a block-wise extension)."""

    cache: HybridCache
    previous: HybridCache
    logits: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------
# Layers (§5)
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm in fp32, times the weight in fp32, cast back; ``group_size`` normalises channel groups."""

    def __init__(self, size: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.group_size = eps, group_size or size

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``gate`` (the Mamba z): normalise ``x * silu(gate)`` (norm after gating)."""
        h = x.float() if gate is None else x.float() * F.silu(gate.float())
        g = h.unflatten(-1, (-1, self.group_size))
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (self.weight.float() * h).to(x.dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal."""
    t = a.shape[-1]
    below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    s = a[..., None].expand(*a.shape, t).masked_fill(~below, 0).cumsum(-2)
    return s.masked_fill(~torch.ones_like(below).tril(), -math.inf)


def ssd_scan(x, dt, A, B, C, D, state, chunk_size: int):
    """Exact Mamba-2 SSD scan seeded with ``state``, in fp32 (chunked: quadratic within a chunk,
    recurrent across chunks). x [b,l,h,p], dt [b,l,h] (after softplus), A/D [h], B/C [b,l,g,n],
    state [b,h,p,n]. Returns y [b,l,h,p] (with the D skip) and the final state."""
    x, dt, A, B, C, D, state = (v.float() for v in (x, dt, A, B, C, D, state))
    if x.is_cuda and mamba_chunk_scan_combined is not None:
        if x.shape[1] == 1:  # the stock single-step decode kernel (updates its state argument in place)
            h, p, n = x.shape[2], x.shape[3], B.shape[-1]
            state = state.clone()
            y = selective_state_update(state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, p),
                                       A[:, None, None].expand(h, p, n), B[:, 0], C[:, 0],
                                       D=D[:, None].expand(h, p))
            return y[:, None], state
        return mamba_chunk_scan_combined(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(),
                                         chunk_size, D=D, initial_states=state, return_final_states=True)
    length, h = x.shape[1], x.shape[2]
    B, C = (v.repeat_interleave(h // v.shape[2], dim=2) for v in (B, C))  # head h reads group h // (nh/G)
    pad = -length % chunk_size  # zero dt on padding: no decay, no input, so the final state is exact
    xs, dt, B, C = (F.pad(v, [0, 0] * (v.dim() - 2) + [0, pad]).unflatten(1, (-1, chunk_size))
                    for v in (x, dt, B, C))  # [b, c, q, ...]
    xdt = xs * dt[..., None]
    a = (dt * A).permute(0, 3, 1, 2)  # [b, h, c, q]
    a_cum = a.cumsum(-1)
    y = torch.einsum("bcqhn,bcshn,bhcqs,bcshp->bcqhp", C, B, torch.exp(_segsum(a)), xdt)  # within chunks
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, torch.exp(a_cum[..., -1:] - a_cum), xdt)
    states = torch.cat([state[:, None], states], dim=1)  # [b, c+1, h, p, n]: seed, then each chunk's input
    states = torch.einsum("bhzc,bchpn->bzhpn", torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0)))), states)
    y = y + torch.einsum("bcqhn,bchpn,bhcq->bcqhp", C, states[:, :-1], torch.exp(a_cum))  # from chunk starts
    return y.flatten(1, 2)[:, :length] + x * D[:, None], states[:, -1]


def causal_conv_silu(seq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise conv + SiLU over ``seq`` [b, K-1+l, d] (K-1 seed columns, then l new) -> [b, l, d]."""
    k = weight.shape[-1]
    if seq.is_cuda and causal_conv1d_fn is not None:
        out = causal_conv1d_fn(seq.transpose(1, 2).contiguous(), weight[:, 0], bias, activation="silu")
        out = out[..., k - 1:]
    else:
        out = F.silu(F.conv1d(seq.transpose(1, 2), weight, bias, groups=weight.shape[0]))
    return out.transpose(1, 2)


class Mamba2Mixer(nn.Module):
    """Mamba-2: [z, xBC, dt] = in_proj(h); xBC = silu(conv(xBC)); SSD scan; gated RMSNorm; out_proj."""

    def __init__(self, config):
        super().__init__()
        self.nh, self.p, self.g, self.n = config.mamba_num_heads, config.mamba_head_dim, config.n_groups, \
            config.ssm_state_size
        self.d_inner = self.nh * self.p
        self.conv_dim = self.d_inner + 2 * self.g * self.n
        self.chunk_size = config.chunk_size
        limit = tuple(config.time_step_limit)
        self.dt_limit = None if limit == (0.0, math.inf) else limit
        proj_size = self.d_inner + self.conv_dim + self.nh  # rows [z ; x B C ; dt]
        self.in_proj = nn.Linear(config.hidden_size, proj_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.nh))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.nh + 1)))
        self.D = nn.Parameter(torch.ones(self.nh))
        self.norm = RMSNorm(self.d_inner, config.layer_norm_epsilon, group_size=self.d_inner // self.g)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.use_bias)

    def forward(self, h: torch.Tensor, state: LayerState, block_scan: bool):
        """One function for prefill, extension and the denoiser: a forward-only scan seeded with ``state``
        (the conv with its last K-1 raw inputs). ``block_scan`` (denoiser, block-wise extension, §7): no
        dt clamp; otherwise ``time_step_limit`` clamps dt as the stock kernels do."""
        z, xbc, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.nh], dim=-1)
        raw = torch.cat([state.conv.to(xbc.dtype).transpose(1, 2), xbc], dim=1)  # [b, K + l, conv_dim]
        conv_state = raw[:, -self.conv1d.kernel_size[0]:].transpose(1, 2)
        xbc = causal_conv_silu(raw[:, 1:], self.conv1d.weight, self.conv1d.bias)
        x, B, C = xbc.split([self.d_inner, self.g * self.n, self.g * self.n], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit is not None and not block_scan:
            dt = dt.clamp(*self.dt_limit)
        y, ssm = ssd_scan(x.unflatten(-1, (self.nh, self.p)), dt, -torch.exp(self.A_log.float()),
                          B.unflatten(-1, (self.g, self.n)), C.unflatten(-1, (self.g, self.n)), self.D,
                          state.ssm, self.chunk_size)
        y = self.norm(y.flatten(-2).to(h.dtype), gate=z)
        return self.out_proj(y), LayerState(conv=conv_state, ssm=ssm)


class Attention(nn.Module):
    """GQA attention without positional encoding over [cached K/V ; new K/V]."""

    def __init__(self, config):
        super().__init__()
        self.nq, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.nq * self.hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.nkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.nkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.nq * self.hd, config.hidden_size, bias=bias)

    def forward(self, h: torch.Tensor, state: LayerState, causal: bool):
        """``causal``: query i sees the cache and new keys <= i (bottom-right aligned); otherwise no mask
        at all (the denoiser block, §7)."""
        b, length, _ = h.shape
        q = self.q_proj(h).view(b, length, self.nq, self.hd).transpose(1, 2)
        k, v = (torch.cat([old.to(h.dtype), proj(h).view(b, length, self.nkv, self.hd).transpose(1, 2)], 2)
                for old, proj in ((state.key, self.k_proj), (state.value, self.v_proj)))
        total, mask = k.shape[2], None
        if causal:
            mask = torch.ones(length, total, dtype=torch.bool, device=h.device).tril(total - length)
        rep = self.nq // self.nkv  # query head j uses KV head j // rep
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask, scale=self.hd ** -0.5)
        out = self.o_proj(out.transpose(1, 2).reshape(b, length, self.nq * self.hd))
        return out, LayerState(key=k, value=v)


class MLP(nn.Module):
    """down(act(up(x))), no gate (act = relu² for NemotronH)."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.mlp_hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(h)))


class Router(nn.Module):
    """The MoE gate: ``weight`` [E, H] and the aux-loss-free ``e_score_correction_bias`` [E] (a buffer)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        bias = torch.zeros(config.n_routed_experts, dtype=torch.float32)  # fp32 whatever the model dtype
        self.register_buffer("e_score_correction_bias", bias, persistent=True)


class MoE(nn.Module):
    """Sigmoid top-k router in fp64; experts weighted by their normalised scores; + the shared expert."""

    def __init__(self, config):
        super().__init__()
        if config.n_group != 1 or config.topk_group != 1:
            raise NotImplementedError("grouped expert routing (n_group > 1) is not part of the release")
        self.top_k, self.scaling, self.normalise = config.num_experts_per_tok, config.routed_scaling_factor, \
            config.norm_topk_prob
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = (MLP(config, config.moe_shared_expert_intermediate_size)
                               if config.n_shared_experts else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        scores = F.linear(x.double(), self.gate.weight.double()).sigmoid()
        chosen = (scores + self.gate.e_score_correction_bias.double()).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = (weights * self.scaling).float()
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)
            routed.index_add_(0, token, self.experts[e](x[token]).float() * weights[token, slot, None])
        routed = routed.to(h.dtype).view_as(h)
        return routed if self.shared_experts is None else routed + self.shared_experts(h)


MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "moe": MoE,
          "mlp": lambda config: MLP(config, config.intermediate_size)}


class Block(nn.Module):
    """Pre-norm residual layer; with a modulation (shift, scale, gate) the adaLN order of §6.7."""

    def __init__(self, config, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MIXERS[kind](config)

    def forward(self, x, state: LayerState, *, causal: bool, block_scan: bool, modulation=None):
        """-> (x + [gate ·] mixer(...), the layer's new state)."""
        if modulation is None:
            h = self.norm(x)
        elif self.kind in ("mamba", "attention"):  # modulate the raw stream, then norm (fused in Megatron)
            shift, scale, _ = modulation  # each [B, 1, H]
            h = self.norm((x * (1 + scale) + shift).to(x.dtype))
        else:  # the separate pre-MLP norm, then modulate
            shift, scale, _ = modulation
            h = self.norm(x) * (1 + scale) + shift
        if self.kind == "mamba":
            out, state = self.mixer(h, state, block_scan)
        elif self.kind == "attention":
            out, state = self.mixer(h, state, causal)
        else:
            out = self.mixer(h)
        return x + (out if modulation is None else modulation[2] * out), state


class NemotronHTower(nn.Module):
    """One NemotronH backbone (``embeddings``, ``layers.{i}``, ``norm_f``); always runs on a cache."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layers_block_type)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, cache: HybridCache, *, causal: bool = True, block_scan: bool = False,
                modulations: list | None = None):
        """-> (final-normed hidden states [B, L, H], the cache extended by these tokens)."""
        x = self.embeddings(input_ids)
        states = []
        for i, (layer, state) in enumerate(zip(self.layers, cache.layers)):
            x, state = layer(x, state, causal=causal, block_scan=block_scan,
                             modulation=None if modulations is None else modulations[i])
            states.append(state)
        return self.norm_f(x), HybridCache(states, cache.length + input_ids.shape[1])


# ----------------------------------------------------------------------------------------------------
# Time conditioning (§6)
# ----------------------------------------------------------------------------------------------------
def sinusoidal_time_embedding(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, 256] in ``dtype``: t cast to ``dtype``, ×1000 in that dtype (bf16 rounds:
    15/16 -> 936), then [cos(s·f) ; sin(s·f)] in fp32 with f_j = 10000^(-j/128), cast back."""
    s = t.to(dtype) * 1000
    half = _FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = s.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_FREQ_DIM, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """[B, V] -> [B, 1]: argmax at temperature <= 0, else softmax(logits/T), top-k then top-p, multinomial."""
    if temperature is None or temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_k is not None and top_k > 0:
        kth = probs.topk(min(top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = F.pad((sorted_p.cumsum(-1) > top_p)[..., :-1], (1, 0))  # keep up to the token crossing top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.multinomial(probs, num_samples=1)


class NemotronHTwoTowerForCausalLM(PreTrainedModel, GenerationMixin):
    """The released TwoTower: context tower + head, denoiser tower + head, adaLN-single time conditioning.

    ``forward``/``generate`` are the context tower's causal LM (HF ``generate`` with this model's
    :class:`HybridCache`); ``generate_ar``, ``generate_mock_ar``, ``generate_mask_diffusion`` are the
    release's decoders (§9)."""

    config_class = NemotronHTwoTowerConfig
    base_model_prefix = "backbone"  # as the release: no such submodule, the model is its own base
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _is_stateful = True

    def __init__(self, config: NemotronHTwoTowerConfig):
        super().__init__(config)
        if config.residual_in_fp32:
            raise NotImplementedError("residual_in_fp32: the release keeps the residual in the model dtype")
        h = config.hidden_size
        self.context_tower = NemotronHTower(config)
        self.context_lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.denoiser_tower = NemotronHTower(config)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(h)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 3 * h))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.randn(3, h) / h ** 0.5) for _ in range(config.num_hidden_layers))
        self._last_nfe = 0
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Conv/Embedding normal(initializer_range), norms ones
        if isinstance(module, Mamba2Mixer):  # as NemotronH: A = 1..nh, D = 1, softplus(dt_bias) log-uniform
            c = self.config
            dt = torch.exp(torch.rand(module.nh) * math.log(c.time_step_max / c.time_step_min)
                           + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
            inits = ((module.A_log, torch.log(torch.arange(1.0, module.nh + 1))),
                     (module.D, torch.ones(module.nh)), (module.dt_bias, dt + torch.log(-torch.expm1(-dt))))
            for p, value in inits:
                if not getattr(p, "_is_hf_initialized", False):
                    with torch.no_grad():
                        p.copy_(value)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, nn.ParameterList):  # the adaLN tables: N(0, 1)/sqrt(H)
            for p in module:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    def get_input_embeddings(self):
        return self.context_tower.embeddings

    def set_input_embeddings(self, value):
        self.context_tower.embeddings = value

    def get_output_embeddings(self):
        return self.context_lm_head

    def set_output_embeddings(self, value):
        self.context_lm_head = value

    def _empty_context_cache(self, batch: int) -> HybridCache:
        return HybridCache.empty(self.config, batch, self._ctx_device, self.context_lm_head.weight.dtype)

    @property
    def _ctx_device(self):
        return self.context_lm_head.weight.device

    @property
    def _den_device(self):
        return self.lm_head.weight.device

    def place_towers_on_devices(self, ctx_device="cuda:0", den_device="cuda:1"):
        """§9.1: context tower + its head on ``ctx_device``; denoiser, its head and the time conditioning
        on ``den_device``. Caches live on the context device and are copied over once per block."""
        for module, device in ((self.context_tower, ctx_device), (self.context_lm_head, ctx_device),
                               (self.denoiser_tower, den_device), (self.lm_head, den_device),
                               (self.t_embedder, den_device), (self.t_block, den_device),
                               (self.scale_shift_tables, den_device)):
            module.to(device)
        return self

    # ---------------------------------------------------------------- HF causal-LM interface (context)
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: HybridCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, cache: HybridCache | None = None, **kwargs):
        """Context tower + ``context_lm_head`` as a causal LM; logits fp32 [B, L, V]. A :class:`HybridCache`
        (``past_key_values``, or ``cache`` as transformers 5 calls it) continues from its states."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: pass unpadded (equal-length) sequences")
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, HybridCache):
            cache = self._empty_context_cache(input_ids.shape[0])
        hidden, new_cache = self.context_tower(input_ids.to(self._ctx_device), cache)
        logits = self.context_lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache_out = {_CACHE_FIELD: new_cache if use_cache else None}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_out)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: forward creates and returns a HybridCache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, HybridCache):
            input_ids = input_ids[:, cache.length:]  # only the tokens the cache has not seen
        else:
            cache = None
        return {"input_ids": input_ids, _CACHE_FIELD: cache, "use_cache": use_cache,
                "attention_mask": attention_mask}

    # ---------------------------------------------------------------- context cache (§8)
    def _build_context_cache(self, input_ids: torch.LongTensor) -> ContextState:
        """Two passes: x_0..x_{S-2} in one causal pass ("S-2"), then the last token as a decode step
        ("S-1", full K/V, the head's logits). A 1-token prompt starts from the empty (zero) states."""
        ids = input_ids.to(self._ctx_device)
        cache = self._empty_context_cache(ids.shape[0])
        if ids.shape[1] > 1:
            cache = self.context_tower(ids[:, :-1], cache)[1]
        return self._extend_context_cache(ContextState(cache, cache, None), ids[:, -1:], block_wise=False)

    def _extend_context_cache(self, ctx: ContextState, tokens: torch.LongTensor, *,
                              block_wise: bool) -> ContextState:
        """Append committed ``tokens`` [B, L] to the context. ``block_wise`` (after a diffusion block): one
        pass, causal attention, fp32 scan without dt clamp, no logits; ``previous`` = the state before the
        block. Otherwise token by token with stock decode steps, updating ``logits``; ``previous`` = the
        state before the last token."""
        tokens = tokens.to(self._ctx_device)
        if block_wise:
            return ContextState(self.context_tower(tokens, ctx.cache, block_scan=True)[1], ctx.cache, None)
        for j in range(tokens.shape[1]):
            hidden, cache = self.context_tower(tokens[:, j:j + 1], ctx.cache)
            ctx = ContextState(cache, ctx.cache, self.context_lm_head(hidden[:, -1]).float())
        return ctx

    # ---------------------------------------------------------------- denoiser (§6, §7)
    def _modulations(self, t: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """t [B] -> per layer (shift, scale, gate), each [B, 1, H] (t_block output + that layer's table)."""
        dtype = self.t_block[1].weight.dtype
        m = self.t_block(self.t_embedder.mlp(sinusoidal_time_embedding(t.to(self._den_device), dtype)))
        m = m.unflatten(-1, (3, -1))
        return [(m + table).unsqueeze(2).unbind(1) for table in self.scale_shift_tables]

    def _denoise_block(self, xt: torch.LongTensor, t: torch.Tensor | None,
                       den_cache: HybridCache) -> torch.Tensor:
        """One denoiser forward over a block ``xt`` [B, L] at time ``t`` [B] (None: no modulation) on the
        read-only ``den_cache`` (context S-1 states, full K/V): attention without a mask over [context ;
        block], Mamba seeded from the context and scanned in fp32. -> logits [B, L, V] fp32."""
        hidden, _ = self.denoiser_tower(xt.to(self._den_device), den_cache, causal=False, block_scan=True,
                                        modulations=None if t is None else self._modulations(t))
        return self.lm_head(hidden).float()

    # ---------------------------------------------------------------- decoders (§9)
    @torch.no_grad()
    def generate_ar(self, input_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                    eos_token_id=None) -> torch.LongTensor:
        """§9.4: the context tower alone; stops after the step in which any row emits ``eos_token_id``."""
        ctx, out = self._build_context_cache(input_ids), [input_ids]
        for step in range(max_new_tokens):
            tok = _sample(ctx.logits, temperature, top_k, top_p).to(input_ids.device)
            out.append(tok)
            if (eos_token_id is not None and bool((tok == eos_token_id).any())) or step + 1 == max_new_tokens:
                break
            ctx = self._extend_context_cache(ctx, tok, block_wise=False)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_mock_ar(self, input_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                         eos_token_id=None) -> torch.LongTensor:
        """§9.3: one token per step from the denoiser without time conditioning, re-feeding the newest
        token on the context caches shifted back by one (``ctx.previous``: Mamba S-2, K/V[:-1]). Equals
        ``generate_ar`` when the denoiser (tower and head) is a copy of the context tower."""
        ctx, out, tok = self._build_context_cache(input_ids), [input_ids], input_ids[:, -1:]
        for step in range(max_new_tokens):
            hidden, _ = self.denoiser_tower(tok.to(self._den_device), ctx.previous.to(self._den_device))
            tok = _sample(self.lm_head(hidden[:, -1]).float(), temperature, top_k, top_p).to(input_ids.device)
            out.append(tok)
            if (eos_token_id is not None and bool((tok == eos_token_id).any())) or step + 1 == max_new_tokens:
                break
            ctx = self._extend_context_cache(ctx, tok, block_wise=False)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_mask_diffusion(self, input_ids, max_new_tokens=128, block_size=16, steps_per_block=16,
                                mask_token_id=3, temperature=0.0, top_k=None, confidence_threshold=0.9,
                                eos_token_id=None, step_callback: Callable | None = None) -> torch.LongTensor:
        """§9.2: block-wise mask diffusion with confidence unmasking -> [B, P + n] (prompt + blocks).

        Per block (all masks) and step k < T: t = masked fraction of the whole batch; predict every
        masked position; commit the positions with confidence > threshold (at least 1 and at least
        ceil(n / (T - k)); all at the last step) and re-mask the rest (lowest confidence first). After
        a block: extend the context block-wise; stop if any row emitted eos. ``self._last_nfe`` = the
        number of denoiser forwards. ``top_k`` is accepted and unused, as in the release.
        ``step_callback(step, steps_per_block, xt, t=, logits=, block_idx=)`` as the release calls it."""
        if max_new_tokens % block_size != 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be a multiple of block_size "
                             f"({block_size})")
        ctx, out, nfe = self._build_context_cache(input_ids), [input_ids], 0
        for block_idx in range(max_new_tokens // block_size):
            den_cache = ctx.cache.to(self._den_device)  # read-only for the whole block
            xt = torch.full((input_ids.shape[0], block_size), mask_token_id, device=input_ids.device)
            if step_callback is not None:
                step_callback(0, steps_per_block, xt, t=1.0, logits=None, block_idx=block_idx)
            for step in range(steps_per_block):
                masked = xt == mask_token_id
                if not bool(masked.any()):
                    break
                t = masked.float().mean()
                logits = self._denoise_block(xt, t.expand(xt.shape[0]), den_cache).to(xt.device)
                nfe += 1
                new = self._unmask_step(xt, masked, logits, step, steps_per_block, mask_token_id, temperature,
                                        confidence_threshold)
                if step_callback is not None:
                    step_callback(step, steps_per_block, xt, t=float(t), logits=logits, block_idx=block_idx)
                xt = new
            out.append(xt)
            ctx = self._extend_context_cache(ctx, xt, block_wise=True)
            if eos_token_id is not None and bool((xt == eos_token_id).any()):
                break
        self._last_nfe = nfe
        return torch.cat(out, dim=1)

    @staticmethod
    def _unmask_step(xt, masked, logits, step, steps, mask_token_id, temperature, threshold):
        """One confidence-unmasking step (§9.2) -> the new block [B, L]."""
        logits = logits.clone()
        logits[..., mask_token_id] = -1e12
        logp = logits.log_softmax(-1)
        if temperature <= 0:
            pred = logp.argmax(-1)
        else:  # Gumbel-max: a sample of softmax(logits / T) without the mask token
            gumbel = -torch.log(-torch.log(torch.rand_like(logp).clamp(min=1e-10)))
            pred = ((logits / temperature).log_softmax(-1) + gumbel).argmax(-1)
        conf = logp.gather(-1, pred[..., None]).squeeze(-1).exp().masked_fill(~masked, math.inf)
        n = masked.sum(-1)
        if step == steps - 1:  # (the min-commit rules below would give the same; written as released)
            commit = n
        else:
            above = ((conf > threshold) & masked).sum(-1)
            at_least = (n + max(1, steps - step) - 1) // max(1, steps - step)  # ceil(n / (T - k))
            commit = torch.minimum(torch.maximum(above.clamp(min=1), at_least), n)
        # rank of each position by confidence; masked ones (finite) come first, lowest first
        order = conf.argsort(dim=-1, stable=True)
        positions = torch.arange(xt.shape[1], device=xt.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        remask = masked & (rank < (n - commit)[:, None])
        return torch.where(masked, pred, xt).masked_fill(remask, mask_token_id)
