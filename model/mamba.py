"""Mamba-2 mixer, tensor-parallel over SSM heads and B/C groups.

Stage: the ``M`` layers of the hybrid stack. Input ``x: [s(/tp), b, h]``. Output
``[s(/tp), b, h]`` and, on request, the SSM and conv states the denoiser needs:

* ``initial_ssm_state [b, nh_l, p, n]`` / ``initial_conv_state [b, conv_l, k-1]`` seed the
  scan (a denoiser block starts from the context tower's state at the block boundary);
* ``state_every=S`` returns the states at every multiple of ``S`` (the context tower hands
  them to the denoiser), ``return_final_state`` the states after the last token (decoding).

Maths (Mamba-2, Dao & Gu 2024): ``[z, xBC, dt] = in_proj(x)``; ``xBC = silu(conv1d(xBC))``;
``y = SSD(x, dt, A, B, C) + D x``; ``out = out_proj(gated_rmsnorm(y, z))``.

Tensor parallelism: ``in_proj`` is one column-parallel linear (a spec submodule: megatron's, or TE's
with the pre-norm fused in) whose *rank-local* output is
laid out ``[z_r ; x_r ; B_r ; C_r ; dt_r]`` (each component's r-th slice), so one GEMM serves
all components and no rank ever needs another's heads. The HF importer
(``hf_import.py``) builds that layout from the full ``[z ; x ; B ; C ; dt]`` weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from twotower.model.causal_conv import causal_conv1d
from twotower.model.config import BackboneConfig
from twotower.model.norm import GatedRMSNorm
from twotower.model.ssd import ssd_chunk_scan


@dataclass
class MambaStates:
    """States a Mamba layer hands out (all fp32 SSM states; conv states in the input dtype).

    ``ssm_boundary [b, n_blocks, nh_l, p, n]`` / ``conv_boundary [b, n_blocks, conv_l, k-1]``:
    entry ``k`` is the state after tokens ``[0, (k+1) S)``, i.e. what block ``k+1`` starts from.
    ``ssm_final [b, nh_l, p, n]`` / ``conv_final [b, conv_l, k-1]``: after the last token.
    """

    ssm_boundary: torch.Tensor | None = None
    conv_boundary: torch.Tensor | None = None
    ssm_final: torch.Tensor | None = None
    conv_final: torch.Tensor | None = None


@dataclass
class MambaMixerSubmodules:
    """The mixer's linear layers (``specs.py`` chooses them: megatron's tensor-parallel linears, or
    TE's with the layer's pre-norm fused into ``in_proj``)."""

    in_proj: type | ModuleSpec = ColumnParallelLinear
    out_proj: type | ModuleSpec = RowParallelLinear


class MambaMixer(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, backbone: BackboneConfig,
                 ssm_backend: str = "auto", submodules: MambaMixerSubmodules | None = None,
                 device: torch.device | str | None = None):
        super().__init__(config)
        submodules = submodules or MambaMixerSubmodules()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        bb = backbone
        self.layer_number = layer_number
        self.ssm_backend = ssm_backend
        self.head_dim, self.state_dim, self.kernel = bb.mamba_head_dim, bb.mamba_state_dim, bb.mamba_conv_kernel
        self.chunk_size = bb.mamba_chunk_size
        self.dt_limit = (bb.mamba_dt_min, bb.mamba_dt_max)
        self.heads_local = bb.mamba_num_heads // tp
        self.groups_local = bb.mamba_num_groups // tp
        self.d_inner_local = self.heads_local * self.head_dim
        self.bc_local = self.groups_local * self.state_dim
        self.conv_dim_local = self.d_inner_local + 2 * self.bc_local

        proj_out = 2 * bb.mamba_d_inner + 2 * bb.mamba_num_groups * bb.mamba_state_dim + bb.mamba_num_heads
        self.in_proj = build_module(
            submodules.in_proj, bb.hidden_size, proj_out, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
        )
        # Our own parameters are created on `device` and in the config's dtype (megatron's linears
        # follow the builder's device context and params_dtype): no module-wide .to() afterwards.
        f = {"device": device, "dtype": config.params_dtype}
        # Depthwise causal conv over [x ; B ; C] channels: weight [conv_l, k], TP-split on dim 0.
        self.conv1d_weight = nn.Parameter(torch.empty(self.conv_dim_local, self.kernel, **f))
        self.conv1d_bias = nn.Parameter(torch.zeros(self.conv_dim_local, **f)) if bb.mamba_conv_bias else None
        # Per-head SSM parameters; A = -exp(A_log) keeps the decay in (0, 1).
        self.A_log = nn.Parameter(torch.empty(self.heads_local, **f))
        self.D = nn.Parameter(torch.ones(self.heads_local, **f))
        self.dt_bias = nn.Parameter(torch.empty(self.heads_local, **f))
        for p in (self.conv1d_weight, self.conv1d_bias, self.A_log, self.D, self.dt_bias):
            if p is not None:
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self.norm = GatedRMSNorm(self.d_inner_local, group_size=bb.mamba_d_inner // bb.mamba_num_groups,
                                 eps=bb.norm_eps, **f)
        set_tensor_model_parallel_attributes(self.norm.weight, is_parallel=True, dim=0, stride=1)
        self.out_proj = build_module(
            submodules.out_proj, bb.mamba_d_inner, bb.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="fc2",
        )
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba-2 init: A in [1, 16] (log), dt log-uniform in [dt_min, dt_max] via inverse softplus."""
        nn.init.kaiming_uniform_(self.conv1d_weight, a=math.sqrt(5))
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self,
        x: torch.Tensor,
        initial_ssm_state: torch.Tensor | None = None,
        initial_conv_state: torch.Tensor | None = None,
        state_every: int | None = None,
        return_final_state: bool = False,
        block_size: int | None = None,
        block_wise: bool = False,
    ) -> tuple[torch.Tensor, MambaStates | None]:
        """Args:
            x: ``[s(/tp), b, h]``.
            initial_ssm_state / initial_conv_state: per sequence ``[b, ...]``, or per block
                ``[b * n_blocks, ...]`` (batch-major) with ``block_size``.
            state_every: also return the states at every multiple of this many tokens.
            return_final_state: also return the states after the last token.
            block_size: scan every block of this many tokens as an independent sequence
                (the denoiser: each block starts from its own seeded state). Implies ``block_wise``.
            block_wise: the release's seeded block scan (denoiser blocks, and the context's
                block-wise extension after a decoded block): fp32 inputs and no dt clamp
                (``model.mamba_dt_min/max`` apply to the stock causal scans only).
        Returns ``(out [s(/tp), b, h], MambaStates | None)``.
        """
        zxbcdt, _ = self.in_proj(x)  # [s, b, proj_l]; SP all-gathers the sequence
        zxbcdt = zxbcdt.transpose(0, 1)  # [b, s, proj_l]
        batch, seq, _ = zxbcdt.shape
        if block_size is not None:
            if seq % block_size:
                raise ValueError(f"Mamba block-wise scan: sequence length {seq} is not a multiple of "
                                 f"block_size {block_size}")
            zxbcdt = zxbcdt.reshape(batch * (seq // block_size), block_size, -1)  # [b*nb, S, proj_l]
        b, s, _ = zxbcdt.shape
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner_local, self.conv_dim_local, self.heads_local], dim=-1)

        conv = causal_conv1d(
            xbc.transpose(1, 2), self.conv1d_weight, self.conv1d_bias, activation="silu",
            initial_state=initial_conv_state, state_every=state_every,
            return_final_state=return_final_state, backend=self.ssm_backend,
        )
        xbc = conv.y.transpose(1, 2)  # [b, s, conv_l]
        xs, B, C = torch.split(xbc, [self.d_inner_local, self.bc_local, self.bc_local], dim=-1)
        A = -torch.exp(self.A_log.float())
        block_wise = block_wise or block_size is not None
        if block_wise:  # seeded states reach O(1e3) over long contexts: a bf16 scan overflows
            xs, dt, B, C = xs.float(), dt.float(), B.float(), C.float()
        # A denoiser block (or a decoded block) is one short sequence: scan it as ONE chunk of its
        # own length (the release's training: chunk = block size) instead of padding it to 128.
        chunk = min(self.chunk_size, s) if block_wise else self.chunk_size
        ssd = ssd_chunk_scan(
            xs.reshape(b, s, self.heads_local, self.head_dim), dt,
            A, B.reshape(b, s, self.groups_local, self.state_dim), C.reshape(b, s, self.groups_local, self.state_dim),
            chunk_size=chunk, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            dt_limit=(0.0, float("inf")) if block_wise else self.dt_limit,
            initial_states=initial_ssm_state, state_every=state_every,
            return_final_state=return_final_state, backend=self.ssm_backend,
        )
        y = ssd.y.to(z.dtype).reshape(b, s, self.d_inner_local)
        y = self.norm(y, z).reshape(batch, seq, self.d_inner_local)
        out, _ = self.out_proj(y.transpose(0, 1).contiguous())  # [s(/tp), b, h]; SP reduce-scatters
        states = None
        if state_every is not None or return_final_state:
            states = MambaStates(ssd.boundary_states, conv.boundary_states, ssd.final_state, conv.final_state)
        return out, states

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP-independent dist-checkpoint state: fused tensors split into components (``sharding.py``)."""
        from twotower.model.sharding import mamba_sharded_state_dict

        return mamba_sharded_state_dict(self, prefix, sharded_offsets, metadata)
