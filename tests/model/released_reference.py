"""An independent plain-PyTorch oracle of NVIDIA's *released* Nemotron-Labs-TwoTower model.

Written from ``/work/shared/spec/release.md`` (§2-§9: the semantics of the HF remote code
``modeling_nemotron_twotower.py`` after the "fix denoiser" commit). It imports only torch, math and
the standard library and shares no code with ``twotower`` or ``transformers``. Clarity beats speed:
Mamba-2 is an exact token-by-token recurrence and the MoE loops over experts, so use tiny shapes.

Shapes: B batch, L tokens of this call, T cached tokens, H hidden, V vocab; Mamba nh heads of hp
channels, G groups, N state size, K conv kernel; attention nq query / nkv KV heads of hd channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

LAYER_CODE = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E",
              "mlp": "-"}
MODULATE_BEFORE_NORM = "M*"  # §6.7: these types modulate the raw residual stream, then normalise
TIME_SCALE = 1000.0  # §6.1: s = t * 1000 (the module attribute misleadingly called max_period)
SINUSOID_PERIOD = 10000.0  # §6.2: the sinusoid's real max period
ROUTER_KEYS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")  # kept in fp32, routed in fp64


def layer_pattern(config: dict) -> str:
    """'M', '*', 'E', '-' per layer, from ``hybrid_override_pattern`` or ``layers_block_type``."""
    if config.get("hybrid_override_pattern"):
        return config["hybrid_override_pattern"]
    return "".join(LAYER_CODE[t] for t in config["layers_block_type"])


def rms_norm(x, weight, eps):
    """§5: mean of squares in fp32, times the weight in fp32, cast back to the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def modulate(u, shift, scale):
    """§6.6: u [B, L, H] * (1 + scale) + shift, with shift/scale [B, H] broadcast over tokens."""
    return u * (1 + scale[:, None]) + shift[:, None]


def scaled_time(t, dtype):
    """§6.1: t [B] is cast to the model dtype FIRST, then s = t * 1000 is rounded in that dtype."""
    return t.to(dtype) * TIME_SCALE


def timestep_embedding(s, dim=256):
    """§6.2: fp32 [cos(s f) ; sin(s f)] (cos first), f_j = exp(-ln(10000) j / (dim/2)); cast to s.dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(SINUSOID_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    args = s.float()[:, None] * freqs[None].to(s.device)  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], -1).to(s.dtype)  # [B, dim]


def sample_token(logits, temperature, top_k, top_p, generator):
    """§9.4 (AR / mock-AR): greedy at T <= 0, else softmax(logits/T) -> top-k -> top-p -> multinomial.
    logits [B, V] -> token ids [B, 1]."""
    if temperature is None or temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_k and top_k > 0:
        kth = probs.topk(min(top_k, probs.shape[-1]), -1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool), cum[..., :-1] > top_p], -1)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.multinomial(probs, 1, generator=generator)


def diffusion_predict(logits, mask_token_id, temperature, generator=None):
    """§9.2: logits [B, L, V] -> (prediction [B, L], confidence [B, L]). The mask logit is set to
    -1e12 before any softmax; confidence = temperature-1 probability of the prediction."""
    constrained = logits.float().clone()
    constrained[..., mask_token_id] = -1e12
    log_p = torch.log_softmax(constrained, -1)
    if temperature <= 0:
        pred = log_p.argmax(-1)
    else:  # Gumbel-max on log-softmax(logits / T): a sample from softmax(logits / T) without the mask
        scaled = torch.log_softmax(constrained / temperature, -1)
        u = torch.rand(scaled.shape, generator=generator, device=scaled.device).clamp(min=1e-10)
        pred = (scaled - torch.log(-torch.log(u))).argmax(-1)
    return pred, log_p.exp().gather(-1, pred[..., None])[..., 0]


def num_to_commit(n_masked, n_above, step, steps):
    """§9.2 per row: last step -> n; else min(max(a if a > 0 else 1, ceil(n / max(1, T - k))), n)."""
    if step == steps - 1:
        return n_masked
    c = torch.where(n_above > 0, n_above, torch.ones_like(n_above))
    m = torch.ceil(n_masked.float() / max(1, steps - step)).long()
    return torch.minimum(torch.maximum(c, m), n_masked)


@dataclass
class Cache:
    """Context-tower cache (§8), keyed by global layer index. Mamba: conv[i] [B, conv_dim, K] = the
    last K raw (pre-conv) xBC inputs, most recent last; ssm[i] [B, nh, hp, N] fp32. Attention: k[i],
    v[i] [B, nkv, T, hd]. s2_conv/s2_ssm: the Mamba states before the last extension ("S-2", for
    mock-AR). logits [B, V] fp32: context head at the last position after a token-wise step, else None."""

    length: int
    conv: dict
    ssm: dict
    k: dict
    v: dict
    s2_conv: dict
    s2_ssm: dict
    logits: torch.Tensor | None = None


class ReleasedTwoTower:
    """The released two-tower model: frozen context tower + context_lm_head, denoiser tower + lm_head,
    adaLN-single time conditioning (t_embedder, t_block, one (shift, scale, gate) table per layer)."""

    def __init__(self, config: dict, state_dict: dict, dtype=torch.float32):
        c = dict(config)
        self.pattern, self.dtype = layer_pattern(c), dtype
        self.H, self.V, self.eps = c["hidden_size"], c["vocab_size"], c.get("layer_norm_epsilon", 1e-5)
        self.nq, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or self.H // self.nq
        self.nh, self.hp, self.G = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"]
        self.N, self.K, self.conv_bias = c["ssm_state_size"], c["conv_kernel"], c.get("use_conv_bias", True)
        self.d_inner, self.conv_dim = self.nh * self.hp, self.nh * self.hp + 2 * self.G * self.N
        self.dt_limit = tuple(float(v) for v in (c.get("time_step_limit") or (0.0, math.inf)))  # stock paths only
        self.E, self.topk = c.get("n_routed_experts"), c.get("num_experts_per_tok")
        self.F, self.F_shared = c.get("moe_intermediate_size"), c.get("moe_shared_expert_intermediate_size")
        self.scaling, self.norm_topk = c.get("routed_scaling_factor", 1.0), c.get("norm_topk_prob", True)
        self.F_mlp = c.get("intermediate_size")  # dense '-' layers
        if c.get("mamba_hidden_act", "silu") != "silu" or c.get("mlp_hidden_act", "relu2") != "relu2":
            raise NotImplementedError("the release uses silu (Mamba) and relu2 (MLP / experts)")
        if c.get("n_group", 1) != 1 or c.get("topk_group", 1) != 1:
            raise NotImplementedError("grouped routing (n_group > 1) is not part of the release")
        sd = {k.replace(".embedding.", ".embeddings."): v for k, v in state_dict.items()}  # §3 load hook
        self.D_f = sd["t_embedder.mlp.0.weight"].shape[1] if "t_embedder.mlp.0.weight" in sd else 256
        want = self.expected_shapes()
        missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        if missing or unexpected:
            raise KeyError(f"released state dict mismatch: missing {missing}, unexpected {unexpected}")
        bad = [f"{k}: {tuple(sd[k].shape)} != {want[k]}" for k in want if tuple(sd[k].shape) != want[k]]
        if bad:
            raise ValueError("released state dict shape mismatch: " + "; ".join(bad))
        self.w = {k: v.detach().to(torch.float32 if k.endswith(ROUTER_KEYS) else dtype) for k, v in sd.items()}

    def expected_shapes(self) -> dict:
        """§3: every released key and its shape for this config."""
        H, V, d_in, E, nh, q, kv = self.H, self.V, self.d_inner, self.E, self.nh, self.nq * self.hd, self.nkv * self.hd
        mixer = {  # per layer type: key under "{tower}.layers.{i}.mixer." -> shape
            "M": {"in_proj.weight": (2 * d_in + 2 * self.G * self.N + nh, H), "conv1d.weight": (self.conv_dim, 1, self.K),
                  **({"conv1d.bias": (self.conv_dim,)} if self.conv_bias else {}), "dt_bias": (nh,), "A_log": (nh,),
                  "D": (nh,), "norm.weight": (d_in,), "out_proj.weight": (H, d_in)},
            "*": {"q_proj.weight": (q, H), "k_proj.weight": (kv, H), "v_proj.weight": (kv, H), "o_proj.weight": (H, q)},
            "E": {"gate.weight": (E, H), "gate.e_score_correction_bias": (E,),
                  "shared_experts.up_proj.weight": (self.F_shared, H), "shared_experts.down_proj.weight": (H, self.F_shared),
                  **{f"experts.{e}.up_proj.weight": (self.F, H) for e in range(E or 0)},  # one tensor per expert
                  **{f"experts.{e}.down_proj.weight": (H, self.F) for e in range(E or 0)}},
            "-": {"up_proj.weight": (self.F_mlp, H), "down_proj.weight": (H, self.F_mlp)},
        }
        want = {"context_lm_head.weight": (V, H), "lm_head.weight": (V, H),
                "t_embedder.mlp.0.weight": (H, self.D_f), "t_embedder.mlp.0.bias": (H,),
                "t_embedder.mlp.2.weight": (H, H), "t_embedder.mlp.2.bias": (H,),
                "t_block.1.weight": (3 * H, H), "t_block.1.bias": (3 * H,)}
        want.update({f"scale_shift_tables.{i}": (3, H) for i in range(len(self.pattern))})
        for tower in ("context_tower", "denoiser_tower"):
            want[f"{tower}.embeddings.weight"], want[f"{tower}.norm_f.weight"] = (V, H), (H,)
            for i, kind in enumerate(self.pattern):
                want[f"{tower}.layers.{i}.norm.weight"] = (H,)
                want.update({f"{tower}.layers.{i}.mixer.{k}": shape for k, shape in mixer[kind].items()})
        return want

    # ---------------------------------------------------------------------------------------- mixers
    def _mamba(self, m, h, conv, ssm, clamp):
        """§5/§7 Mamba-2, exact sequential recurrence in fp32 seeded with (conv, ssm). h [B, L, H].
        clamp: Δ clamped by time_step_limit (stock paths only). Returns out [B, L, H], conv, ssm."""
        w, (B, L, _), GN = self.w, h.shape, self.G * self.N
        z, xbc, dt = (h @ w[m + "in_proj.weight"].T).split([self.d_inner, self.conv_dim, self.nh], -1)
        hist = torch.cat([conv.transpose(1, 2)[:, 1:].to(xbc.dtype), xbc], 1)  # [B, K-1+L, conv_dim] raw
        windows = hist.unfold(1, self.K, 1).float()  # [B, L, conv_dim, K], causal depthwise conv
        xbc = (windows * w[m + "conv1d.weight"][:, 0].float()).sum(-1)
        if self.conv_bias:
            xbc = xbc + w[m + "conv1d.bias"].float()
        x, Bm, Cm = F.silu(xbc).to(h.dtype).float().split([self.d_inner, GN, GN], -1)
        x = x.view(B, L, self.nh, self.hp)
        Bm = Bm.view(B, L, self.G, self.N).repeat_interleave(self.nh // self.G, 2)  # head h: group h//(nh/G)
        Cm = Cm.view(B, L, self.G, self.N).repeat_interleave(self.nh // self.G, 2)  # [B, L, nh, N]
        delta = F.softplus(dt.float() + w[m + "dt_bias"].float())  # [B, L, nh]
        if clamp:
            delta = delta.clamp(*self.dt_limit)
        A, D = -torch.exp(w[m + "A_log"].float()), w[m + "D"].float()
        state, ys = ssm.float(), []  # state [B, nh, hp, N]
        for t in range(L):
            decay = torch.exp(delta[:, t] * A)[..., None, None]
            state = state * decay + (delta[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
            ys.append((state * Cm[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])  # [B, nh, hp]
        y = torch.stack(ys, 1).reshape(B, L, self.d_inner).to(h.dtype)
        g = (y.float() * F.silu(z.float())).view(B, L, self.G, -1)  # gated RMSNorm: gate first, then norm
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)  # groups of d_inner / G
        g = (g.reshape(B, L, self.d_inner) * w[m + "norm.weight"].float()).to(h.dtype)
        return g @ w[m + "out_proj.weight"].T, hist[:, -self.K:].transpose(1, 2).contiguous(), state

    def _attention(self, m, h, k_past, v_past, causal):
        """GQA without positions, scale 1/sqrt(hd), keys = [past ; new]. causal: bottom-right aligned
        mask; otherwise no mask at all. Returns out [B, L, H], k, v [B, nkv, T+L, hd]."""
        w, (B, L, _) = self.w, h.shape
        q = (h @ w[m + "q_proj.weight"].T).view(B, L, self.nq, self.hd).transpose(1, 2)
        k = (h @ w[m + "k_proj.weight"].T).view(B, L, self.nkv, self.hd).transpose(1, 2)
        v = (h @ w[m + "v_proj.weight"].T).view(B, L, self.nkv, self.hd).transpose(1, 2)
        k, v = torch.cat([k_past.to(k.dtype), k], 2), torch.cat([v_past.to(v.dtype), v], 2)
        rep = self.nq // self.nkv  # query head j uses KV head j // rep
        scores = q.float() @ k.repeat_interleave(rep, 1).float().transpose(-1, -2) / math.sqrt(self.hd)
        if causal:
            T = k_past.shape[2]
            visible = torch.arange(T + L)[None] <= (T + torch.arange(L))[:, None]  # [L, T+L]
            scores = scores.masked_fill(~visible.to(scores.device), -math.inf)
        out = (scores.softmax(-1) @ v.repeat_interleave(rep, 1).float()).to(h.dtype)  # [B, nq, L, hd]
        return out.transpose(1, 2).reshape(B, L, -1) @ w[m + "o_proj.weight"].T, k, v

    def _mlp(self, m, h):
        return F.relu(h @ self.w[m + "up_proj.weight"].T).square() @ self.w[m + "down_proj.weight"].T

    def _moe(self, m, h):
        """§5 MoE: fp64 sigmoid router, top-k of score + bias, weights = chosen scores normalised
        (+1e-20) x routed_scaling_factor; experts relu²(up)->down; plus the shared expert."""
        w, shape = self.w, h.shape
        x = h.reshape(-1, shape[-1])  # [B*L, H]
        scores = torch.sigmoid(x.double() @ w[m + "gate.weight"].double().T)  # [B*L, E]
        chosen = (scores + w[m + "gate.e_score_correction_bias"].double()).topk(self.topk, -1).indices
        weights = scores.gather(1, chosen)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.E):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                y = self._mlp(f"{m}experts.{e}.", x[rows])
                out.index_add_(0, rows, y.float() * weights[rows, slot, None].float())
        return out.to(h.dtype).view(shape) + self._mlp(m + "shared_experts.", h)

    # ---------------------------------------------------------------------------------- one tower
    def _modulation(self, t):
        """§6.1-6.4: t [B] -> [B, 3, H], rows (shift, scale, gate), before the per-layer tables."""
        w = self.w
        e = timestep_embedding(scaled_time(t, self.dtype), self.D_f)  # [B, 256] model dtype
        e = F.silu(e @ w["t_embedder.mlp.0.weight"].T + w["t_embedder.mlp.0.bias"])
        e = e @ w["t_embedder.mlp.2.weight"].T + w["t_embedder.mlp.2.bias"]  # [B, H]
        return (F.silu(e) @ w["t_block.1.weight"].T + w["t_block.1.bias"]).view(-1, 3, self.H)

    def _tower(self, tower, head, ids, cache, *, causal, clamp, mod=None):
        """One pass of a tower over ids [B, L] continuing `cache` (not modified). mod: [B, 3, H] from
        `_modulation` (§6.5-6.7) or None. Returns (logits [B, L, V] fp32, the cache after the pass)."""
        w = self.w
        x = w[f"{tower}.embeddings.weight"][ids]  # [B, L, H]
        new = replace(cache, length=cache.length + ids.shape[1], conv=dict(cache.conv), ssm=dict(cache.ssm),
                      k=dict(cache.k), v=dict(cache.v), logits=None)
        for i, kind in enumerate(self.pattern):
            p = f"{tower}.layers.{i}."
            if mod is None:
                h = rms_norm(x, w[p + "norm.weight"], self.eps)
            else:
                shift, scale, gate = (mod + w[f"scale_shift_tables.{i}"]).unbind(1)  # each [B, H]
                if kind in MODULATE_BEFORE_NORM:
                    h = rms_norm(modulate(x, shift, scale).to(self.dtype), w[p + "norm.weight"], self.eps)
                else:
                    h = modulate(rms_norm(x, w[p + "norm.weight"], self.eps), shift, scale)
            if kind == "M":
                out, new.conv[i], new.ssm[i] = self._mamba(p + "mixer.", h, cache.conv[i], cache.ssm[i], clamp)
            elif kind == "*":
                out, new.k[i], new.v[i] = self._attention(p + "mixer.", h, cache.k[i], cache.v[i], causal)
            elif kind == "E":
                out = self._moe(p + "mixer.", h)
            else:
                out = self._mlp(p + "mixer.", h)
            x = x + (out if mod is None else gate[:, None] * out)  # residual add in the model dtype
        logits = (rms_norm(x, w[f"{tower}.norm_f.weight"], self.eps) @ w[head].T).float()
        return logits, new

    # ------------------------------------------------------------------------ caches (§8)
    def empty_cache(self, batch: int, device=None) -> Cache:
        """Zero conv/SSM states and no keys: the state before any token."""
        conv = {i: torch.zeros(batch, self.conv_dim, self.K, dtype=self.dtype, device=device)
                for i, c in enumerate(self.pattern) if c == "M"}
        ssm = {i: torch.zeros(batch, self.nh, self.hp, self.N, device=device) for i in conv}
        kv = {i: torch.zeros(batch, self.nkv, 0, self.hd, dtype=self.dtype, device=device)
              for i, c in enumerate(self.pattern) if c == "*"}
        return Cache(0, conv, ssm, kv, dict(kv), dict(conv), dict(ssm))

    def _context(self, ids, cache, clamp=True):
        """Causal context-tower pass continuing `cache` -> (logits [B, L, V], cache after)."""
        return self._tower("context_tower", "context_lm_head.weight", ids, cache, causal=True, clamp=clamp)

    def context_logits(self, ids):
        """Plain causal pass of the context tower + context_lm_head: [B, L, V] fp32."""
        return self._context(ids, self.empty_cache(ids.shape[0], ids.device))[0]

    def prefill(self, ids) -> Cache:
        """Two passes: x_0..x_{S-2} (its Mamba states become "S-2"), then x_{S-1} as one decode step
        (S-1 states, full K/V, last-position logits). S = 1: an empty cache before the single token."""
        cache = self.empty_cache(ids.shape[0], ids.device)
        if ids.shape[1] > 1:
            cache = self._context(ids[:, :-1], cache)[1]
        return self.extend(cache, ids[:, -1:], block_wise=False)[0]

    def extend(self, cache, ids, block_wise: bool):
        """Append ids [B, L] to the context. The pre-extension Mamba states become the new "S-2" (as in
        the release, also for L > 1). block_wise: one causal pass, fp32 scan without Δ clamp, no logits.
        Otherwise one stock decode step per token; returns the last position's logits [B, V]."""
        s2 = (dict(cache.conv), dict(cache.ssm))
        if block_wise:
            new, logits = self._context(ids, cache, clamp=False)[1], None
        else:
            new = cache
            for j in range(ids.shape[1]):
                step_logits, new = self._context(ids[:, j:j + 1], new)
            logits = step_logits[:, -1]
        new.s2_conv, new.s2_ssm, new.logits = s2[0], s2[1], logits
        return new, logits

    # ---------------------------------------------------------------------- denoiser (§6-§7)
    def denoise_block(self, xt, t, cache):
        """Raw denoiser logits [B, L, V] fp32 for one block xt [B, L] given the context cache (S-1
        states, all context K/V): no attention mask, fp32 seeded scan, no Δ clamp. t [B] or None."""
        mod = None
        if t is not None:
            mod = self._modulation(torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(xt.shape[0]))
        return self._tower("denoiser_tower", "lm_head.weight", xt, cache, causal=False, clamp=False, mod=mod)[0]

    def training_logits(self, x0, xt, t, block_size):
        """§7 training equivalent, block by block: block b is denoised from the context cache of
        x0[:, :b*S] (block 0: zero states, no keys). t: [B, L/S], or [B] / [B, 1] (one t per sequence).
        The cache grows by continuing the stock causal pass: in this sequential reference the same
        computation as prefill(x0[:, :b*S])."""
        B, L = x0.shape
        if L % block_size:
            raise ValueError(f"sequence length {L} is not a multiple of block_size {block_size}")
        t = torch.as_tensor(t, dtype=torch.float32).reshape(B, -1).expand(B, L // block_size)
        cache, out = self.empty_cache(B, x0.device), []
        for b in range(L // block_size):
            blk = slice(b * block_size, (b + 1) * block_size)
            out.append(self.denoise_block(xt[:, blk], t[:, b], cache))
            cache = self._context(x0[:, blk], cache)[1]
        return torch.cat(out, 1)

    # ---------------------------------------------------------------------------- decoders (§9)
    def _token_by_token(self, input_ids, max_new_tokens, next_logits, sampling, eos_token_id):
        """One token per step from next_logits(cache, newest token [B, 1]) -> [B, V]; stop after appending
        a step where any row is eos; token-by-token context extension."""
        cache, out, last = self.prefill(input_ids), [input_ids], input_ids[:, -1:]
        for step in range(max_new_tokens):
            last = sample_token(next_logits(cache, last), *sampling)
            out.append(last)
            if (eos_token_id is not None and (last == eos_token_id).any()) or step == max_new_tokens - 1:
                break
            cache = self.extend(cache, last, block_wise=False)[0]
        return torch.cat(out, 1)

    def generate_ar(self, input_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None,
                    generator=None):
        """§9.4: context tower + context_lm_head only."""
        return self._token_by_token(input_ids, max_new_tokens, lambda cache, last: cache.logits,
                                    (temperature, top_k, top_p, generator), eos_token_id)

    def mock_ar_logits(self, cache, last):
        """§9.3: the denoiser (no t, causal stock step) on the newest token last [B, 1], from the
        context cache shifted back one token (S-2 Mamba states, K/V without the last position)."""
        shifted = Cache(cache.length - 1, cache.s2_conv, cache.s2_ssm, {i: k[:, :, :-1] for i, k in cache.k.items()},
                        {i: v[:, :, :-1] for i, v in cache.v.items()}, {}, {})
        return self._tower("denoiser_tower", "lm_head.weight", last, shifted, causal=True, clamp=True)[0][:, -1]

    def generate_mock_ar(self, input_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None,
                         generator=None):
        """§9.3: the denoiser predicts each next token from the shifted context caches."""
        return self._token_by_token(input_ids, max_new_tokens, self.mock_ar_logits,
                                    (temperature, top_k, top_p, generator), eos_token_id)

    def generate_mask_diffusion(self, input_ids, max_new_tokens, block_size=16, steps_per_block=16, mask_token_id=3,
                                temperature=0.0, confidence_threshold=0.9, eos_token_id=None, generator=None):
        """§9.2 confidence unmasking. Returns (prompt + generated blocks [B, S + n*L], NFE)."""
        if max_new_tokens % block_size:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be a multiple of block_size ({block_size})")
        B, cache, out, nfe = input_ids.shape[0], self.prefill(input_ids), [input_ids], 0
        for _ in range(max_new_tokens // block_size):
            xt = torch.full((B, block_size), mask_token_id, dtype=torch.long, device=input_ids.device)
            for step in range(steps_per_block):
                masked = xt == mask_token_id  # [B, L]
                if not masked.any():
                    break
                t = masked.float().mean().expand(B)  # ONE batch-mean t for every row
                logits = self.denoise_block(xt, t, cache)
                nfe += 1
                pred, conf = diffusion_predict(logits, mask_token_id, temperature, generator)
                conf = conf.masked_fill(~masked, math.inf)
                n = masked.sum(-1)
                commit = num_to_commit(n, ((conf > confidence_threshold) & masked).sum(-1), step, steps_per_block)
                new = torch.where(masked, pred, xt)
                for b in range(B):  # re-mask the n - commit least confident of this step's masked positions
                    idx = masked[b].nonzero()[:, 0]
                    lowest = idx[conf[b, idx].sort(stable=True).indices[: int(n[b] - commit[b])]]
                    new[b, lowest] = mask_token_id
                xt = new
            out.append(xt)
            cache = self.extend(cache, xt, block_wise=True)[0]
            if eos_token_id is not None and (xt == eos_token_id).any():
                break
        return torch.cat(out, 1), nfe


# ------------------------------------------------------------------------------------- checkpoints
def _released_tower(hf_sd, tower, head):
    """A NemotronHForCausalLM state dict (model./backbone. prefix; fused or per-expert MoE) -> released keys."""
    out = {}
    for key, value in hf_sd.items():
        value, prefix = value.detach().clone(), next((p for p in ("model.", "backbone.") if key.startswith(p)), "")
        if key == "lm_head.weight":
            out[head] = value
            continue
        if not prefix:
            raise KeyError(f"unexpected key {key!r}: expected a 'model.' or 'backbone.' prefix or lm_head.weight")
        key = key[len(prefix):]
        if key.startswith("embedding."):  # the load hook's alias (§3)
            key = "embeddings." + key[len("embedding."):]
        base, _, proj = key.rpartition(".")
        if base.endswith("mixer.experts") and proj in ("up_proj", "down_proj"):  # fused [E, out, in]
            out.update({f"{tower}.{base}.{e}.{proj}.weight": w_e.clone() for e, w_e in enumerate(value.unbind(0))})
        else:
            out[f"{tower}.{key}"] = value
    return out


def _random_adaln(hidden, n_layers, dtype, seed=0, dim=256):
    """§6.8 init: PyTorch's default Linear init (U(±1/sqrt(fan_in)) for weight and bias) for t_embedder
    and t_block, tables ~ N(0, 1)/sqrt(H); drawn from a fixed-seed generator."""
    g, H = torch.Generator().manual_seed(seed), hidden

    def uniform(*shape, fan_in):
        return ((torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(fan_in)).to(dtype)

    out = {"t_embedder.mlp.0.weight": uniform(H, dim, fan_in=dim), "t_embedder.mlp.0.bias": uniform(H, fan_in=dim),
           "t_embedder.mlp.2.weight": uniform(H, H, fan_in=H), "t_embedder.mlp.2.bias": uniform(H, fan_in=H),
           "t_block.1.weight": uniform(3 * H, H, fan_in=H), "t_block.1.bias": uniform(3 * H, fan_in=H)}
    out.update({f"scale_shift_tables.{i}": (torch.randn(3, H, generator=g) / math.sqrt(H)).to(dtype)
                for i in range(n_layers)})
    return out


def released_state_dict(context_hf_sd: dict, denoiser_hf_sd: dict | None = None, adaln: dict | None = None,
                        hidden_size: int | None = None) -> dict:
    """Released-layout state dict (§3) from HF NemotronHForCausalLM state dicts. denoiser_hf_sd None ->
    a copy of the context; adaln None -> the release's random init (§6.8) from a fixed seed."""
    sd = _released_tower(context_hf_sd, "context_tower", "context_lm_head.weight")
    sd.update(_released_tower(context_hf_sd if denoiser_hf_sd is None else denoiser_hf_sd,
                              "denoiser_tower", "lm_head.weight"))
    if adaln is None:
        emb = sd["context_tower.embeddings.weight"]
        n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("context_tower.layers."))
        adaln = _random_adaln(hidden_size or emb.shape[1], n_layers, emb.dtype)
    sd.update({k: v.detach().clone() for k, v in adaln.items()})
    return sd
