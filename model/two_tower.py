"""TwoTower: a frozen causal context tower and a trained block-diffusion denoiser tower.

Stage: the model of the diffusion objective. Both towers are ``NemotronHModel`` copies of
one backbone; the denoiser adds the release's adaLN-single time conditioning (``adaln.py``:
``t_embedder``, ``t_block``, ``scale_shift_tables``). Parameter names follow the released
checkpoint (``context_tower``, ``denoiser_tower``, ``t_embedder``, ``t_block``,
``scale_shift_tables.{i}``).

Vectorised training pass (``forward``), one call for all blocks of ``x0, xt: [b, L]``
with block size ``S`` and times ``t: [b, 1]`` (one per sequence, the release's recipe) or
``[b, L/S]`` (one per block)::

    hc = context.embed(x0)   (no grad)            hd = denoiser.embed(xt)
    for layer i (both towers in lockstep):
        hc, aux = context.layers[i](hc)           aux: K/V, or Mamba states at every k*S
        hd = denoiser.layers[i](hd, aux, adaLN_i(t))
           '*': queries of block b see context keys < b*S and their own block (bidirectional)
           'M': every block is scanned on its own (fp32, no dt clamp), seeded with the
                context state at b*S (block 0: zero states, no context keys)
    ce = CE(denoiser.head(hd), x0)               SUBS: the mask token is never predicted

Only layer i's context K/V and boundary states are alive at a time during the forward; with
``recompute='none'`` (default) autograd keeps each Mamba layer's block-start states for the
backward (at the tiny CPU scale: 1.15x the AR step's saved memory, 1.4x its time). With
``recompute='mamba'`` a Mamba layer pair is wrapped in activation checkpointing: backward
re-runs context layer i to rebuild the per-boundary states (~12x a hidden activation per token
at 30B scale) instead of keeping them for every layer (0.65x AR memory, ~1.9x AR time on CPU).

``context_forward`` / ``denoise_block`` are the same computation one block at a time
(a plain causal prefix pass, then the denoiser on one block over the prefix cache): the
decoding path, and the naive reference the tests compare the vectorised pass against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from twotower.model.adaln import ADALN_INITS, build_time_conditioning, layer_modulation, shared_modulation
from twotower.model.backbone import NemotronHModel, gather_logits
from twotower.model.cache import LayerCache, TowerCache
from twotower.model.config import BackboneConfig, ConfigError, ParallelConfig
from twotower.model.core_attention import MaskSpec
from twotower.model.device import building_on, resolve_device
from twotower.model.specs import get_hybrid_layer_specs
from twotower.model.transformer_config import to_transformer_config


@dataclass
class TwoTowerConfig:
    """The denoiser's extras and the block structure."""

    block_size: int = 16
    """Tokens per diffusion block S (the release: 16)."""
    mask_token_id: int = 3
    """Id of [MASK] (the release: 3). Its logit is never predicted (SUBS)."""
    adaln_init: str = "identity"
    """Init of the time conditioning: ``identity`` (t_block zero, tables (0, 0, 1): a fresh
    denoiser computes exactly the backbone's function) or ``release`` (the public code's random
    init; a fresh denoiser is NOT the backbone)."""
    recompute: str = "none"
    """Activation checkpointing of layer pairs: Mamba pairs only (their per-boundary states are
    big), every pair, or none."""

    def __post_init__(self) -> None:
        if self.adaln_init not in ADALN_INITS:
            raise ConfigError(f"twotower.adaln_init={self.adaln_init!r}: use one of {', '.join(ADALN_INITS)}")
        if self.recompute not in ("none", "mamba", "full"):
            raise ConfigError(f"twotower.recompute={self.recompute!r}: use 'none', 'mamba' or 'full'")

    def validate(self, backbone: BackboneConfig, seq_len: int | None = None) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"twotower.block_size={self.block_size} must be positive")
        if not 0 <= self.mask_token_id < backbone.vocab_size:
            raise ConfigError(f"twotower.mask_token_id={self.mask_token_id} is outside the vocabulary "
                              f"[0, {backbone.vocab_size}) of the model")
        if seq_len is not None:
            if self.block_size > seq_len:
                raise ConfigError(f"twotower.block_size={self.block_size} is larger than the sequence "
                                  f"length {seq_len}")
            if seq_len % self.block_size:
                raise ConfigError(f"sequence length {seq_len} is not a multiple of twotower.block_size="
                                  f"{self.block_size}")


@dataclass
class TwoTowerOutput:
    ce: torch.Tensor
    """``[b, L]`` fp32: ``-log p_theta(x0_i | xt, clean prefix)`` at every position (the loss
    uses the masked ones)."""
    logits: torch.Tensor | None = None
    """``[b, L, vocab]`` denoiser logits (mask token at -inf), when asked for."""
    ar_nll: torch.Tensor | None = None
    """``[b, L-1]`` fp32 next-token NLL of the frozen context tower on the clean tokens."""


class TwoTowerModel(MegatronModule):
    def __init__(self, config: TransformerConfig, backbone: BackboneConfig, twotower: TwoTowerConfig,
                 parallel: ParallelConfig, pre_process: bool = True, post_process: bool = True,
                 layer_range: tuple[int, int] | None = None, device: torch.device | str | None = None):
        super().__init__(config)
        twotower.validate(backbone)
        self.backbone, self.twotower = backbone, twotower
        self.pre_process, self.post_process = pre_process, post_process
        specs = get_hybrid_layer_specs(backbone, parallel)
        kw = dict(pre_process=pre_process, post_process=post_process, layer_range=layer_range, device=device)
        self.context_tower = NemotronHModel(config, backbone, specs, **kw)
        self.denoiser_tower = NemotronHModel(config, backbone, specs, **kw)
        self._build_time_conditioning(config, layer_range or (0, backbone.num_layers), device)
        # The freeze boundary: the whole context tower, as one module (freezing parts of
        # megatron's layer-stacked tensors breaks optimizer checkpoints).
        self.context_tower.requires_grad_(False)
        self.input_tensor = None
        # Untied embeddings: megatron's finalize_model_grads reads this under PP.
        self.share_embeddings_and_output_weights = False
        # Decoder-only: megatron's pipeline schedules read this.
        self.model_type = ModelType.encoder_or_decoder

    # -- megatron pipeline schedules hand the previous stage's output here: the pair
    # (context hidden ; denoiser hidden) concatenated along the sequence, [2 s(/tp), b, h].
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def train(self, mode: bool = True):
        super().train(mode)
        self.context_tower.train(False)
        return self

    def _build_time_conditioning(self, config: TransformerConfig, layer_range: tuple[int, int], device) -> None:
        """``t_embedder``, ``t_block`` (on every pipeline stage) and this stage's tables.

        Under PP every stage's copy of the shared time network sees the gradient of its own
        layers only: megatron's conditional-embedder path (``has_cond_embedder`` on the config,
        ``.pipeline_parallel`` on the parameters) sums them over the PP group after the DP
        reduction. With the distributed optimizer that is only right if every stage shards
        these parameters the same way over DP: ``shared_embedding`` gives each its own grad
        bucket (megatron's rule for tied embeddings). Stages > 0 mark their copies ``shared`` so
        that the gradient norm counts them once.
        """
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.t_embedder, self.t_block, self.scale_shift_tables = build_time_conditioning(
            self.backbone.hidden_size, list(range(*layer_range)), init=self.twotower.adaln_init,
            device=device, dtype=config.params_dtype, sequence_parallel=config.sequence_parallel,
            pipeline_parallel=pp > 1)
        if pp > 1:
            config.has_cond_embedder = True
            first = parallel_state.get_pipeline_model_parallel_rank() == 0
            for p in self.time_network_parameters():
                p.shared_embedding = True
                p.shared = not first

    def time_network_parameters(self) -> list[torch.nn.Parameter]:
        """The time network every pipeline stage holds a full copy of."""
        return [*self.t_embedder.parameters(), *self.t_block.parameters()]

    def time_conditioning_modules(self) -> dict[str, torch.nn.Module]:
        """``{release name: module}`` of the denoiser's time conditioning."""
        return {"t_embedder": self.t_embedder, "t_block": self.t_block, "scale_shift_tables": self.scale_shift_tables}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """What a TwoTower checkpoint holds: the denoiser and time conditioning (layout-independent keys)
        plus a fingerprint of the frozen context tower (its weights come from the backbone)."""
        from twotower.model.sharding import twotower_sharded_state_dict

        return twotower_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    @torch.no_grad()
    def init_denoiser_from_context(self) -> None:
        """Both towers start as exact copies of the backbone (with ``adaln_init=identity`` the
        denoiser then computes exactly the backbone's function)."""
        self.denoiser_tower.load_state_dict(self.context_tower.state_dict())

    # ------------------------------------------------------------------ vectorised pass
    def forward(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, *,
                return_logits: bool = False, ar_nll: bool = False) -> TwoTowerOutput | torch.Tensor:
        """Args:
            x0: ``[b, L]`` clean tokens; xt: ``[b, L]`` noisy tokens (masked ones = mask id);
            t: ``[b, 1]`` one diffusion time per sequence, or ``[b, L/S]`` one per block.
        Returns ``TwoTowerOutput`` on the last pipeline stage, else the stream pair
        ``[2 s(/tp), b, h]`` for the next stage.
        """
        S = self.twotower.block_size
        L = x0.shape[1]
        self.twotower.validate(self.backbone, L)
        if xt.shape != x0.shape or t.dim() != 2 or t.shape[0] != x0.shape[0] or t.shape[1] not in (1, L // S):
            raise ValueError(f"shapes: x0 {tuple(x0.shape)}, xt {tuple(xt.shape)}, t {tuple(t.shape)}; "
                             f"expected xt like x0 and t [b, 1] or [b, {L // S}]")
        if self.pre_process:
            with torch.no_grad():
                hc = self.context_tower.embed(x0)
            hd = self.denoiser_tower.embed(xt)
        else:  # a later pipeline stage: the pair arrives as one tensor; the context half has no grad
            hc, hd = self.input_tensor.chunk(2, dim=0)
            hc = hc.detach()
        mod = shared_modulation(self.t_embedder, self.t_block, t, L, self._seq_slice(L))  # [1 or blocks, b, 3, h]
        mode = self.twotower.recompute
        for j, (lc, ld) in enumerate(zip(self.context_tower.layers, self.denoiser_tower.layers)):
            i = self.context_tower.layer_offset + j
            wrap = torch.is_grad_enabled() and (mode == "full" or (mode == "mamba" and lc.symbol == "M"))
            if wrap:
                hc, hd = checkpoint(self._layer_pair, i, lc, ld, hc, hd, mod, S, L, use_reentrant=False)
            else:
                hc, hd = self._layer_pair(i, lc, ld, hc, hd, mod, S, L)
        if not self.post_process:
            # What travels to the next stage: both streams (the spec's "pair"), one tensor.
            return torch.cat([hc, hd], dim=0)
        # Logits memory per token: the head's bf16 output (transient) and ONE fp32 copy, which SUBS
        # edits in place and megatron's vocab-parallel CE works on in place and keeps for its
        # backward (training/planner.py counts 2 + 4 bytes per vocab entry).
        logits = self._subs(self.denoiser_tower.head(hd).float(), inplace=True)  # [L, b, V/tp] fp32
        out = TwoTowerOutput(ce=None)
        if return_logits:
            out.logits = gather_logits(logits).clone()
        out.ce = tensor_parallel.vocab_parallel_cross_entropy(logits, x0.t().contiguous()).t()
        if ar_nll:
            with torch.no_grad():
                ctx_logits = self.context_tower.head(hc)[:-1].float()
                out.ar_nll = tensor_parallel.vocab_parallel_cross_entropy(
                    ctx_logits, x0[:, 1:].t().contiguous()).t()
        return out

    def _layer_pair(self, i, lc, ld, hc, hd, mod, S, L):
        """Context layer i (no grad), then denoiser layer i reading what it exposed."""
        m = layer_modulation(mod, self.scale_shift_tables[str(i)])
        if lc.symbol == "M":
            with torch.no_grad():
                hc, st = lc(hc, state_every=S)
            b = hd.shape[1]
            ssm0 = _shift_blocks(st.ssm_boundary).flatten(0, 1)  # [b*nb, nh_l, p, n]
            conv0 = _shift_blocks(st.conv_boundary).flatten(0, 1)  # [b*nb, conv_l, k-1]
            assert ssm0.shape[0] == b * (L // S)
            hd, _ = ld(hd, modulation=m, initial_ssm_state=ssm0, initial_conv_state=conv0, block_size=S)
        elif lc.symbol == "*":
            with torch.no_grad():
                hc, kv = lc(hc)
            hd, _ = ld(hd, modulation=m, kv_prefix=kv, mask=MaskSpec.block_diffusion(S, L))
        else:
            with torch.no_grad():
                hc, _ = lc(hc)
            hd, _ = ld(hd, modulation=m)
        return hc, hd

    # ------------------------------------------------------------------ one block at a time
    @torch.no_grad()
    def context_forward(self, ids: torch.Tensor, cache: TowerCache | None = None, return_logits: bool = False,
                        block_wise: bool = False) -> tuple[torch.Tensor | None, TowerCache]:
        """Causal context pass over ``ids [b, s]`` continuing ``cache``; returns (logits, new cache).

        ``block_wise``: the release's extension by a committed diffusion block (Mamba: the fp32
        seeded block scan without dt clamp); otherwise the stock causal scan (prefill, AR)."""
        ctx = self.context_tower
        cache = cache or TowerCache.empty(len(ctx.layers))
        h = ctx.embed(ids.to(_device_of(ctx)))
        new = TowerCache.empty(len(ctx.layers))
        new.length = cache.length + ids.shape[1]
        for j, layer in enumerate(ctx.layers):
            c = cache.layers[j]
            if layer.symbol == "M":
                h, st = layer(h, initial_ssm_state=c.ssm, initial_conv_state=c.conv, return_final_state=True,
                              block_wise=block_wise)
                new.layers[j] = LayerCache(ssm=st.ssm_final, conv=st.conv_final)
            elif layer.symbol == "*":
                h, (k, v) = layer(h, kv_prefix=cache.kv(j))
                if c.k is not None:
                    k, v = torch.cat([c.k, k], dim=2), torch.cat([c.v, v], dim=2)
                new.layers[j] = LayerCache(k=k, v=v)
            else:
                h, _ = layer(h)
        logits = gather_logits(ctx.head(h)) if return_logits else None
        return logits, new

    def denoise_block(self, xt_block: torch.Tensor, t: torch.Tensor | None, cache: TowerCache,
                      block_wise: bool = True, subs: bool = True) -> torch.Tensor:
        """Denoiser logits ``[b, S', vocab]`` for one noisy block ``[b, S']`` at times ``t [b]``,
        attending over the clean prefix held in ``cache`` (no mask: bidirectional inside the
        block). ``t=None``: no time conditioning (the release's mock-AR step, with
        ``block_wise=False``: the stock causal scan for its single token). ``subs``: the mask
        token's logit at -inf (SUBS)."""
        den = self.denoiser_tower
        dev = _device_of(den)
        if any(t_.device != dev for c in cache.layers for t_ in (c.k, c.ssm) if t_ is not None):
            cache = cache.to(dev)  # towers on different devices (place_towers_on_devices)
        xt_block = xt_block.to(dev)
        h = den.embed(xt_block)
        mod = None if t is None else shared_modulation(self.t_embedder, self.t_block, t.to(dev)[:, None], 1)
        for j, layer in enumerate(den.layers):
            c = cache.layers[j]
            m = None if mod is None else layer_modulation(mod, self.scale_shift_tables[str(den.layer_offset + j)])
            if layer.symbol == "M":
                h, _ = layer(h, modulation=m, initial_ssm_state=c.ssm, initial_conv_state=c.conv,
                             block_wise=block_wise)
            elif layer.symbol == "*":
                h, _ = layer(h, modulation=m, kv_prefix=cache.kv(j), mask=MaskSpec.full())
            else:
                h, _ = layer(h, modulation=m)
        logits = den.head(h)
        return gather_logits(self._subs(logits) if subs else logits)

    # ------------------------------------------------------------------ helpers
    def _subs(self, logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """SUBS parameterisation: the mask token's logit is -inf on the rank that owns it
        (``inplace``: on a tensor nothing else holds, e.g. a fresh fp32 copy)."""
        vl = logits.shape[-1]
        local = self.twotower.mask_token_id - parallel_state.get_tensor_model_parallel_rank() * vl
        if 0 <= local < vl:
            # an int index (no index tensor built from a Python list: that H2D copy syncs the host)
            logits = logits if inplace else logits.clone()
            logits[..., local] = float("-inf")
        return logits

    def _seq_slice(self, L: int) -> slice | None:
        if not self.config.sequence_parallel:
            return None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        r = parallel_state.get_tensor_model_parallel_rank()
        return slice(r * L // tp, (r + 1) * L // tp)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _shift_blocks(boundary: torch.Tensor) -> torch.Tensor:
    """States at the end of blocks ``[b, nb, ...]`` -> states at the start of blocks (zeros first)."""
    return torch.cat([torch.zeros_like(boundary[:, :1]), boundary[:, :-1]], dim=1)


def build_two_tower(backbone: BackboneConfig, parallel: ParallelConfig | None = None,
                    twotower: TwoTowerConfig | None = None, *, params_dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None, pre_process: bool = True,
                    post_process: bool = True, layer_range: tuple[int, int] | None = None,
                    **config_overrides) -> TwoTowerModel:
    """Build both towers on the current megatron parallel state; the denoiser copies the context.

    Every parameter and buffer is created on ``device`` (default: this rank's CUDA device, else the
    CPU; ``meta`` builds the structure without memory) in ``params_dtype``."""
    parallel = parallel or ParallelConfig()
    twotower = twotower or TwoTowerConfig()
    device = resolve_device(device)
    config = to_transformer_config(backbone, parallel, params_dtype=params_dtype, device=device, **config_overrides)
    with building_on(device):
        model = TwoTowerModel(config, backbone, twotower, parallel, pre_process, post_process, layer_range, device)
    model.init_denoiser_from_context()
    return model
