"""Memory and throughput planner for a TwoTower run (refuses layouts that cannot work).

Per-GPU memory (bytes), worst pipeline stage (Megatron mixed precision, Narayanan et al. 2021;
ZeRO-1 style distributed optimizer, Rajbhandari et al. 2020):
  context tower   2 * P_stage                       (bf16, frozen: no grads / optimizer state)
  denoiser        2 * P_stage + 4 * P_stage          (bf16 params + fp32 main grads)
                + 12 * P_stage / dp_opt             (fp32 master + Adam m, v; dp_opt = DP size when the
                                                     distributed optimizer is on, expert params use the
                                                     expert-DP size dp*tp/ep; 1 when it is off)
  P_stage: the stage's layers with attention / Mamba / dense / shared-expert matrices / tp, routed
  experts / ep, router and norms replicated; embedding on the first stage, LM head on the last
  (both when pp = 1), vocab-parallel / tp.
  activations     in-flight micro-batches (1F1B: stage 0 holds pp) x layers x b*L*(values per token)
                  * 2 bytes / tp (sequence parallel), per-type values in ``_act_values``
                + context K/V of the attention layers (kept for the denoiser's backward)
                + transient Mamba boundary states of ONE layer: b * L/S * H*P*N * 4 bytes / tp, x2 (+grad)
                + logits of one micro-batch b*L*V/tp*(4+2) bytes (last stage): the fp32 copy SUBS and the
                  vocab-parallel CE work on in place and keep for backward, and the head's bf16 output
                  while it is cast (model/two_tower.py makes no other copy)
                + adaLN (denoiser layers kept for backward): per token and layer 2 h bf16 values, the
                  modulated copy of the layer input and the mixer output the gate multiplies; the
                  (shift, scale, gate) vectors themselves are per sequence or per block, broadcast, never
                  per token (model/adaln.py)
  overhead        fixed 4 GiB (CUDA context, NCCL buffers, allocator fragmentation).
Throughput: step time = twotower_step_flops(...).total / (num_gpus * peak * mfu); days = budget /
tokens_per_step * step_time / 86400. ``mfu`` is an input: :data:`ASSUMED_MFU` until a GPU measurement
exists, then the measured value (``--mfu-from`` the JSON ``tests/benchmarks/bench_gpu_mfu.py --json``
writes on the cluster's GPU, with the hardware it names).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from twotower.model.config import BackboneConfig, ConfigError, ParallelConfig
from twotower.training.flops import peak_flops, twotower_step_flops

GIB = 2**30
OVERHEAD_GIB = 4.0
#: bf16 values per token a modulated denoiser layer keeps beyond ``_act_values`` (see the docstring).
ADALN_VALUES = 2
#: MFU assumed when no measurement is given. NOT measured: no GPU run of this code exists yet. Basis:
#: Nemotron-3-Nano's own FP8 pretraining in Megatron-Bridge's H100 recipe runs at ~33% of the BF16
#: peak; a bf16 TwoTower step of the 30B layer mix is taken to be comparable. Replace it with the
#: TwoTower MFU that ``tests/benchmarks/bench_gpu_mfu.py --json FILE`` measures (``--mfu-from FILE``).
ASSUMED_MFU = 0.35
ASSUMED_MFU_SOURCE = "assumed (no GPU measurement; ~Megatron-Bridge's Nano H100 recipe)"


def measured_mfu(path: str) -> tuple[float, str]:
    """``(mfu, source)`` from ``bench_gpu_mfu.py --json`` output: the TwoTower step's MFU and the GPU."""
    import json

    with open(path) as f:
        d = json.load(f)
    try:
        return float(d["twotower"]["mfu"]), f"measured on {d['gpu']} ({path})"
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"{path}: not a bench_gpu_mfu.py --json file (need twotower.mfu and gpu): {err}") from err


class PlanError(ValueError):
    """An impossible layout or one that does not fit; the message says what to change."""


def _layer_params(cfg: BackboneConfig, tp: int, ep: int) -> dict[str, tuple[float, float]]:
    """Per-layer (non-expert, expert) parameters held by one GPU, by pattern symbol."""
    h = cfg.hidden_size
    d, gn, H = cfg.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim, cfg.mamba_num_heads
    mamba = (h * (2 * d + 2 * gn + H) + cfg.mamba_conv_dim * (cfg.mamba_conv_kernel + 1) + 3 * H + d
             + d * h) / tp
    attn = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_query_groups) / tp
    shared = 2 * h * (cfg.moe_shared_expert_intermediate_size or 0) / tp
    router = cfg.num_experts * (h + 1)
    experts = cfg.num_experts * 2 * h * cfg.moe_ffn_hidden_size / ep
    return {"M": (mamba + h, 0.0), "*": (attn + h, 0.0), "-": (2 * h * cfg.ffn_hidden_size / tp + h, 0.0),
            "E": (shared + router + h, experts)}


def _act_values(cfg: BackboneConfig, recompute: str) -> dict[str, float]:
    """bf16 values per token a denoiser layer keeps for backward (inputs of its matmuls/norms)."""
    h, d = cfg.hidden_size, cfg.mamba_d_inner
    proj = 2 * d + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.mamba_num_heads
    a, k, e = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    f, fs, kk = cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size or 0, cfg.moe_topk
    vals = {"M": 2 * h + proj + cfg.mamba_conv_dim + 2 * d,  # norm in, in_proj out, conv out, y, gated y
            "*": 2 * h + (a + 2 * k) * e + 2 * a * e,         # norm in, qkv, core out (+ softmax stats ~0)
            "E": 2 * h + kk * h + 2 * kk * f + 2 * fs,        # dispatched tokens, fc1 pre/post act
            "-": 2 * h + 2 * cfg.ffn_hidden_size}
    if recompute == "mamba":
        vals["M"] = h  # only the layer input; the layer (and its boundary states) is rerun in backward
    elif recompute == "full":
        vals = {c: h for c in vals}
    return vals


def _adaln_kept(symbol: str, recompute: str) -> int:
    """1 if a denoiser layer of this type keeps its adaLN extras for backward (not recomputed)."""
    return int(recompute == "none" or (recompute == "mamba" and symbol != "M"))


@dataclass
class Plan:
    memory_gib: dict[str, float]
    gpu_mem_gib: float
    dp: int
    step_time_s: float
    tokens_per_step: int
    days: float
    step_flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_mem_gib

    def table(self) -> str:
        rows = [f"{'per-GPU memory':<34}{'GiB':>10}"] + [f"  {k:<32}{v:>10.2f}" for k, v in self.memory_gib.items()]
        rows += [(f"  {'total':<32}{self.total_gib:>10.2f}  / {self.gpu_mem_gib:g} GiB -> "
                  f"{'fits' if self.fits else 'DOES NOT FIT'}"),
                 f"{'data-parallel size':<34}{self.dp:>10d}",
                 f"{'tokens per step':<34}{self.tokens_per_step:>10,d}",
                 f"{'FLOPs per step':<34}{self.step_flops:>10.3e}",
                 f"{'step time (s)':<34}{self.step_time_s:>10.2f}",
                 f"{'days for the token budget':<34}{self.days:>10.1f}"] + self.notes
        return "\n".join(rows)


def _stages(pattern: str, pp: int) -> list[str]:
    per = math.ceil(len(pattern) / pp)  # megatron's even split; the last stage takes the remainder
    return [pattern[i * per:(i + 1) * per] for i in range(pp)]


def plan(cfg: BackboneConfig, parallel: ParallelConfig, *, num_gpus: int, gpu: str = "H100",
         gpu_mem_gib: float = 80, seq_len: int, micro_batch: int, global_batch: int, block_size: int = 16,
         token_budget: float, mfu: float | None = None, mfu_source: str | None = None,
         distributed_optimizer: bool = True, recompute: str = "mamba", time_per_block: bool = False) -> Plan:
    """Memory and time of one layout (module docstring). ``mfu``: measured (say where in
    ``mfu_source``) or None for :data:`ASSUMED_MFU`. ``time_per_block``: one diffusion time per block
    (else per sequence, the release's recipe); either way the modulation vectors are not per token."""
    if mfu is None:
        mfu, mfu_source = ASSUMED_MFU, ASSUMED_MFU_SOURCE
    mfu_source = mfu_source or "given"
    try:
        cfg.validate_parallel(parallel)
        dp = parallel.data_parallel_size(num_gpus)
    except ConfigError as e:
        raise PlanError(str(e)) from e
    tp, ep, pp = parallel.tp, parallel.ep, parallel.pp
    if seq_len % block_size:
        raise PlanError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
    if global_batch % (dp * micro_batch):
        raise PlanError(f"global_batch={global_batch} is not divisible by dp * micro_batch = {dp} * {micro_batch}")
    if recompute not in ("none", "mamba", "full"):
        raise PlanError(f"recompute={recompute!r}: use 'none', 'mamba' or 'full'")
    sp = parallel.sequence_parallel and tp > 1
    layer_p = _layer_params(cfg, tp, ep)
    vals = _act_values(cfg, recompute)
    vocab = cfg.vocab_size * cfg.hidden_size / tp
    exp_dp = dp * tp // ep  # expert-data-parallel size (megatron: dp*tp ranks share the experts / ep)
    opt_dp, opt_edp = (dp, exp_dp) if distributed_optimizer else (1, 1)
    b, L, in_flight = micro_batch, seq_len, pp  # 1F1B: stage 0 holds pp micro-batches (1 when pp = 1)
    worst = None
    for s, layers in enumerate(_stages(cfg.pattern, pp)):
        dense = sum(layer_p[c][0] for c in layers) + vocab * ((s == 0) + (s == pp - 1))
        expert = sum(layer_p[c][1] for c in layers)
        act_tok = sum(vals[c] for c in layers) * 2 / (tp if sp else 1)  # bytes per token, one micro-batch
        kv = layers.count("*") * 2 * cfg.num_query_groups * cfg.head_dim / tp * 2  # ctx K, V bf16
        mem = {
            "context tower (bf16)": 2 * (dense + expert),
            "denoiser params (bf16)": 2 * (dense + expert),
            "denoiser main grads (fp32)": 4 * (dense + expert),
            "optimizer (fp32 master+Adam)": 12 * (dense / opt_dp + expert / opt_edp),
            "activations": min(in_flight, pp - s) * b * L * (act_tok + kv),
            "mamba boundary states (1 layer)": (2 * b * L // block_size * cfg.mamba_num_heads * cfg.mamba_head_dim
                                                * cfg.mamba_state_dim * 4 / tp) if "M" in layers else 0.0,
            "logits (fp32+bf16)": b * L * cfg.vocab_size / tp * 6 if s == pp - 1 else 0.0,
            "adaLN modulation (denoiser)": min(in_flight, pp - s) * b * L * 2 / (tp if sp else 1) * ADALN_VALUES
                                           * cfg.hidden_size * sum(_adaln_kept(c, recompute) for c in layers)
                                           + b * (L // block_size if time_per_block else 1) * 3 * cfg.hidden_size
                                           * 2 * len(layers),
        }
        mem = {k: v / GIB for k, v in mem.items()}
        mem["fixed overhead"] = OVERHEAD_GIB
        if worst is None or sum(mem.values()) > sum(worst.values()):
            worst = mem
    tokens = global_batch * seq_len
    flops = twotower_step_flops(cfg, seq_len, block_size, tokens, recompute=recompute).total
    step = flops / (num_gpus * peak_flops(gpu) * mfu)
    p = Plan(memory_gib=worst, gpu_mem_gib=gpu_mem_gib, dp=dp, step_time_s=step, tokens_per_step=tokens,
             days=token_budget / tokens * step / 86400, step_flops=flops,
             notes=[(f"layout: tp={tp} ep={ep} pp={pp} dp={dp} sp={sp} dist_opt={distributed_optimizer} "
                     f"recompute={recompute} micro_batch={micro_batch}"), f"mfu={mfu:g}: {mfu_source}"])
    if not p.fits:
        over = p.total_gib - gpu_mem_gib
        big = max(worst, key=worst.get)
        hints = []
        if not distributed_optimizer:
            hints.append("enable the distributed optimizer")
        if ep < cfg.num_experts and cfg.num_experts:
            hints.append("raise EP (experts are the bulk of the weights)")
        hints += ["raise PP", "lower micro_batch" if micro_batch > 1 else "use recompute='full'"]
        raise PlanError(f"estimated {p.total_gib:.1f} GiB per GPU exceeds gpu_mem_gib={gpu_mem_gib:g} by {over:.1f} "
                        f"GiB (largest part: {big} {worst[big]:.1f} GiB); try: {', '.join(hints)}\n{p.table()}")
    return p


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    import yaml

    import twotower.conf
    from twotower.model.config import backbone_config_from_dict
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nemotron3_nano_30b_a3b")
    for name, default in (("gpus", 256), ("tp", 1), ("ep", 8), ("pp", 1), ("seq-len", 8192), ("micro-batch", 1),
                          ("global-batch", 1024), ("block-size", 16)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--tokens", type=float, default=2.1e12)
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--gpu-mem-gib", type=float, default=80)
    ap.add_argument("--mfu", type=float, default=None, help=f"default: {ASSUMED_MFU} ({ASSUMED_MFU_SOURCE})")
    ap.add_argument("--mfu-from", default=None, help="a tests/benchmarks/bench_gpu_mfu.py --json file")
    ap.add_argument("--recompute", default="mamba", choices=("none", "mamba", "full"))
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    a = ap.parse_args(argv)
    path = Path(twotower.conf.__file__).parent / "model" / f"{a.model}.yaml"
    cfg = backbone_config_from_dict(yaml.safe_load(path.read_text()))
    par = ParallelConfig(tp=a.tp, ep=a.ep, pp=a.pp, sequence_parallel=a.tp > 1)
    try:
        mfu, source = measured_mfu(a.mfu_from) if a.mfu_from else (a.mfu, None)
        p = plan(cfg, par, num_gpus=a.gpus, gpu=a.gpu, gpu_mem_gib=a.gpu_mem_gib, seq_len=a.seq_len,
                 micro_batch=a.micro_batch, global_batch=a.global_batch, block_size=a.block_size,
                 token_budget=a.tokens, mfu=mfu, mfu_source=source,
                 distributed_optimizer=not a.no_distributed_optimizer, recompute=a.recompute)
    except PlanError as e:
        raise SystemExit(f"refused: {e}") from None
    print(f"model {a.model}: {cfg.param_counts()['total'] / 1e9:.2f}B params, {a.gpus} x {a.gpu}")
    print(p.table())


if __name__ == "__main__":
    main()
