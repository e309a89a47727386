"""FLOP accounting for TwoTower training (multiply-add = 2 FLOPs) and MFU.

Per token, per layer, forward (h hidden, L sequence, notation of ``BackboneConfig``):

- Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060, Sec. 6 SSD algorithm),
  d = H*P inner width, G groups, N state, K conv kernel, Q chunk:
    in_proj   2*h*(2d + 2GN + H)            out_proj 2*d*h        conv  2*(d + 2GN)*K
    SSD       2*Q*G*N   (C B^T per group, full QxQ block: the masked half is still computed)
            + 2*Q*H*P   ((C B^T o decay) X per head)
            + 2*H*P*N   (chunk states B^T X)  + 2*H*P*N (state -> output C^T h)
            + 2*H*P*N/Q (inter-chunk state passing, linear recurrence over chunks)
  Gated RMSNorm, softplus(dt), exp(decay), D-skip are O(d) elementwise: ignored (< 0.1%).
- Attention (GQA, a heads, k KV groups, head dim e): QKV 2*h*e*(a + 2k), o_proj 2*a*e*h,
  scores + values 4*a*e*K_avg where K_avg = keys each query actually attends:
  causal AR: (L+1)/2; denoiser block-diffusion mask: context keys before the block (avg (L-S)/2)
  plus the S own-block keys, i.e. (L+S)/2 (BD3-LM M_OBC + M_BD without the 2L clean half).
- MoE: router 2*h*E, top-k routed experts 2 * (2*h*f) each (squared-ReLU, not gated: up+down),
  shared expert 2*(2*h*f_s).   Dense MLP: 2*(2*h*ffn).   LM head: 2*h*V.

Training step (Kaplan et al. 2020 / Narayanan et al. 2021: backward = 2x forward):
  TwoTower = context fwd (no grad, causal) + denoiser fwd (block mask) + 2x denoiser fwd
             + recompute (full: one more denoiser fwd; "mamba": the Mamba layers' fwd, the spec's
             per-layer transient boundary-state recompute, context + denoiser Mamba layers).
  The context tower's LM head is not run during TwoTower training (only hidden states/KV/states).
  AR = 3x one tower's causal fwd.
MFU = (FLOPs per step / step time) / (num_gpus * peak) (PaLM, Chowdhery et al. 2022, App. B).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from twotower.model.config import BackboneConfig

# Peak dense bf16 tensor FLOP/s per GPU (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494.5e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def peak_flops(device_name: str, dtype: str = "bf16", cpu_peak: float | None = None) -> float:
    """Peak FLOP/s of one device; ``device_name`` as torch.cuda.get_device_name() or "H100".

    CPUs have no table entry: pass ``cpu_peak`` (measured / datasheet) or get a ValueError."""
    name = device_name.lower()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            if dtype not in table:
                raise ValueError(f"no peak for dtype {dtype!r} on {device_name}; known: {sorted(table)}")
            return table[dtype]
    if cpu_peak is not None:
        return float(cpu_peak)
    raise ValueError(f"unknown device {device_name!r}: known {sorted(PEAK_FLOPS)}; pass cpu_peak")


def mfu(flops_per_step: float, step_time_s: float, num_gpus: int, peak_flops_per_gpu: float) -> float:
    return flops_per_step / step_time_s / (num_gpus * peak_flops_per_gpu)


# ------------------------------------------------------------------ per-token, per-layer
def mamba_flops_per_token(cfg: BackboneConfig) -> dict[str, float]:
    h, H, P = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_head_dim
    G, N, K, Q = cfg.mamba_num_groups, cfg.mamba_state_dim, cfg.mamba_conv_kernel, cfg.mamba_chunk_size
    d = H * P
    return {
        "in_proj": 2 * h * (2 * d + 2 * G * N + H),
        "conv": 2 * cfg.mamba_conv_dim * K,
        "ssd": 2 * Q * G * N + 2 * Q * H * P + 4 * H * P * N + 2 * H * P * N / Q,
        "out_proj": 2 * d * h,
    }


def attention_flops_per_token(cfg: BackboneConfig, keys_per_query: float) -> dict[str, float]:
    h, a, k, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    return {"qkv": 2 * h * e * (a + 2 * k), "core": 4 * a * e * keys_per_query, "o_proj": 2 * a * e * h}


def moe_flops_per_token(cfg: BackboneConfig) -> dict[str, float]:
    h = cfg.hidden_size
    return {"router": 2 * h * cfg.num_experts,
            "experts": cfg.moe_topk * 4 * h * cfg.moe_ffn_hidden_size,
            "shared": 4 * h * (cfg.moe_shared_expert_intermediate_size or 0)}


def causal_keys(seq_len: int) -> float:
    return (seq_len + 1) / 2  # mean of 1..L


def block_diffusion_keys(seq_len: int, block_size: int) -> float:
    # block b (0-based) sees b*S context keys + S own keys; mean over blocks = (L - S)/2 + S
    return (seq_len - block_size) / 2 + block_size


_NAMES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


def layer_flops_per_token(cfg: BackboneConfig, keys_per_query: float) -> dict[str, float]:
    """Forward FLOPs per token of one layer of each type present (keyed by type name)."""
    per = {"M": sum(mamba_flops_per_token(cfg).values()),
           "*": sum(attention_flops_per_token(cfg, keys_per_query).values()),
           "E": sum(moe_flops_per_token(cfg).values()),
           "-": 4 * cfg.hidden_size * cfg.ffn_hidden_size}
    return {_NAMES[c]: per[c] for c in dict.fromkeys(cfg.pattern)}


def model_flops_per_token(cfg: BackboneConfig, seq_len: int, *, keys_per_query: float | None = None,
                          lm_head: bool = True, by_type: bool = False):
    """Forward FLOPs per token of one tower over ``seq_len`` tokens (causal unless keys given)."""
    kq = causal_keys(seq_len) if keys_per_query is None else keys_per_query
    per = layer_flops_per_token(cfg, kq)
    counts = {_NAMES[c]: cfg.pattern.count(c) for c in dict.fromkeys(cfg.pattern)}
    parts = {name: counts[name] * per[name] for name in per}
    parts["lm_head"] = 2 * cfg.hidden_size * cfg.vocab_size if lm_head else 0.0
    return parts if by_type else sum(parts.values())


@dataclass
class FlopBreakdown:
    context_fwd: float
    denoiser_fwd: float
    denoiser_bwd: float
    recompute: float
    per_layer_type: dict[str, float] = field(default_factory=dict)  # step FLOPs by layer type

    @property
    def total(self) -> float:
        return self.context_fwd + self.denoiser_fwd + self.denoiser_bwd + self.recompute


def twotower_step_flops(cfg: BackboneConfig, seq_len: int, block_size: int, batch_tokens: int,
                        recompute: str = "mamba") -> FlopBreakdown:
    """FLOPs of one TwoTower training step over ``batch_tokens`` tokens (sequences of ``seq_len``).

    recompute: "none", "mamba" (Mamba layers of both towers rerun in backward) or "full"."""
    if recompute not in ("none", "mamba", "full"):
        raise ValueError(f"recompute={recompute!r}: use 'none', 'mamba' or 'full'")
    ctx = model_flops_per_token(cfg, seq_len, lm_head=False, by_type=True)
    den = model_flops_per_token(cfg, seq_len, keys_per_query=block_diffusion_keys(seq_len, block_size),
                                by_type=True)
    rec = {k: 0.0 for k in den}
    if recompute == "full":
        rec = dict(den)
    elif recompute == "mamba" and "mamba" in den:
        rec["mamba"] = den["mamba"] + ctx["mamba"]
    per_type = {k: batch_tokens * (ctx.get(k, 0.0) + 3 * den[k] + rec[k]) for k in den}
    t = batch_tokens
    return FlopBreakdown(context_fwd=t * sum(ctx.values()), denoiser_fwd=t * sum(den.values()),
                         denoiser_bwd=2 * t * sum(den.values()), recompute=t * sum(rec.values()),
                         per_layer_type=per_type)


def ar_step_flops(cfg: BackboneConfig, seq_len: int, batch_tokens: int) -> float:
    """Forward + backward FLOPs of one causal tower over ``batch_tokens`` tokens."""
    return 3 * batch_tokens * model_flops_per_token(cfg, seq_len)
