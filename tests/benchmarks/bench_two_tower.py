"""Benchmark a TwoTower training step against an AR step of the same backbone, and the vectorised
TwoTower pass against the naive block loop (context prefix pass + ``denoise_block`` per block).

    .venv/bin/python tests/benchmarks/bench_two_tower.py [--L 512] [--S 16] [--batch 1] [--hidden 128] [--reps 5]

All ratios come from one run: the variants are interleaved each repetition and the median of
``--reps`` (after one warm-up) is reported (wall time, ``time.perf_counter``; CPU fp32,
``torch.set_num_threads(--threads)``). Memory is reported two ways:
  * "saved": bytes of tensors saved for backward during the forward (``saved_tensors_hooks``,
    deduplicated by storage) plus parameters and grads of the trainable parameters; deterministic.
  * "rss": peak ``ru_maxrss`` of a fresh subprocess running 2 steps of one variant (includes the
    Python/torch/megatron baseline, so the ratio is diluted towards 1).
No assertions (machine dependent); prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_cfg(a):
    from twotower.model.config import BackboneConfig

    h = a.hidden
    return BackboneConfig(pattern=a.pattern, vocab_size=a.vocab, hidden_size=h, num_attention_heads=4,
                          num_query_groups=2, head_dim=h // 4, mamba_num_heads=h // 32, mamba_head_dim=64,
                          mamba_num_groups=1, mamba_state_dim=32, mamba_chunk_size=64, ffn_hidden_size=2 * h,
                          num_experts=4, moe_topk=2, moe_ffn_hidden_size=h, moe_shared_expert_intermediate_size=h)


def build(a, kind):
    """kind: 'ar' | 'tt-mamba' | 'tt-none' | 'tt-full'."""
    from twotower.model.backbone import build_backbone
    from twotower.model.config import ParallelConfig
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    par = ParallelConfig(attention_backend="sdpa", ssm_backend="torch")
    torch.manual_seed(0)
    if kind == "ar":
        return build_backbone(make_cfg(a), par)
    return build_two_tower(make_cfg(a), par, TwoTowerConfig(block_size=a.S, mask_token_id=3,
                                                            recompute=kind.split("-", 1)[1]))


def make_batch(a):
    from twotower.training.diffusion import NoiseSchedule, mask_tokens

    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(4, a.vocab, (a.batch, a.L + 1), generator=g)
    t = torch.rand(a.batch, a.L // a.S, generator=g) * 0.9 + 0.05
    xt, masked = mask_tokens(x0[:, :-1], t, a.S, 3, NoiseSchedule(), generator=g)
    return x0, xt, t, masked


def step_fn(model, kind, a, batch, backward=True):
    """One training step (forward + loss + backward) on the same tokens."""
    from twotower.training.diffusion import NoiseSchedule, diffusion_loss

    x0, xt, t, masked = batch
    sched = NoiseSchedule()

    def run():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            if kind == "ar":
                loss = model(x0[:, :-1], labels=x0[:, 1:]).sum()
            else:
                ce = model(x0[:, :-1], xt, t).ce
                loss = diffusion_loss(ce, masked, t, a.S, sched).loss_sum
            if backward:
                loss.backward()
    return run


def naive_fn(model, a, batch, backward):
    """The oracle block loop of the tests (tests/model/naive_block_loop.py), with the same loss."""
    from twotower.training.diffusion import NoiseSchedule, diffusion_loss

    sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
    from naive_block_loop import naive

    x0, xt, t, masked = batch
    x0 = x0[:, :-1]

    def run():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits = naive(model, x0, xt, t, a.S)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x0.flatten(),
                                                   reduction="none").view(x0.shape)
            loss = diffusion_loss(ce, masked, t, a.S, NoiseSchedule()).loss_sum
            if backward:
                loss.backward()
    return run


def timeit(fns, reps):
    """Interleave: each repetition runs every variant once; one warm-up; medians."""
    times = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(model, run):
    """Bytes saved for backward in one forward (dedup by storage) + trainable params + grads."""
    seen = {}

    def pack(x):
        try:
            s = x.untyped_storage()
            seen[(s.data_ptr(), x.device)] = s.nbytes()
        except Exception:  # noqa: BLE001, S110 (sparse / wrapper tensors have no storage to count)
            pass
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    train = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()) + 2 * train, sum(seen.values()), train


def child(a):
    """Fresh-process peak RSS for one variant (2 steps)."""
    init()
    m = build(a, a.child)
    f = step_fn(m, a.child, a, make_batch(a))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f()
    f()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kb": base, "peak_kb": peak}))


def init():
    from twotower.model.parallel_init import init_parallel

    init_parallel()


def rss_of(a, kind):
    argv = [sys.executable, __file__, "--child", kind] + [f"--{k}={getattr(a, k)}" for k in
                                                         ("L", "S", "batch", "hidden", "pattern", "vocab", "threads")]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--L", type=int, default=512)
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pattern", default="M*EM-M*E")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive-backward", action="store_true", help="time the naive loop with backward too")
    p.add_argument("--naive-reps", type=int, default=3)
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess ru_maxrss measurement")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    kinds = ["ar", "tt-mamba", "tt-none"]
    # Children first: init_parallel() exports torch.distributed env vars a child would inherit.
    rss = {} if a.no_rss else {k: rss_of(a, k) for k in kinds}
    init()
    batch = make_batch(a)
    models = {k: build(a, k) for k in kinds}
    steps = {k: step_fn(models[k], k, a, batch) for k in kinds}
    med = timeit(steps, a.reps)
    tt = models["tt-mamba"]
    fwd = {"tt-fwd": step_fn(tt, "tt", a, batch, backward=False),
           "naive": naive_fn(tt, a, batch, backward=a.naive_backward)}
    if a.naive_backward:
        fwd["tt-fwd"] = steps["tt-mamba"]
    nmed = timeit(fwd, a.naive_reps)
    mem = {k: saved_bytes(models[k], steps[k]) for k in kinds}

    mode = "fwd+bwd" if a.naive_backward else "fwd only"
    print(f"\nTwoTower benchmark: pattern={a.pattern} hidden={a.hidden} vocab={a.vocab} L={a.L} S={a.S} "
          f"batch={a.batch} fp32 CPU threads={a.threads}, median of {a.reps} interleaved reps "
          f"(naive: {a.naive_reps})\n")
    print("| measure | value | ratio | target |")
    print("|---|---|---|---|")
    ar = med["ar"]
    print(f"| AR step (fwd+bwd) | {ar * 1e3:.0f} ms | 1.00 | |")
    for k in ("tt-mamba", "tt-none"):
        print(f"| TwoTower step, recompute={k[3:]} | {med[k] * 1e3:.0f} ms | {med[k] / ar:.2f}x AR | <= 1.5 |")
    print(f"| naive block loop ({a.L // a.S} blocks, {mode}) | {nmed['naive'] * 1e3:.0f} ms | "
          f"{nmed['naive'] / nmed['tt-fwd']:.1f}x slower than vectorised ({nmed['tt-fwd'] * 1e3:.0f} ms, {mode}) "
          f"| >= 10x |")
    mb = 2 ** 20
    for k in kinds:
        tot, sv, tr = mem[k]
        r = "1.00" if k == "ar" else f"{tot / mem['ar'][0]:.2f}x AR"
        print(f"| saved-for-bwd + params + grads, {k} | {tot / mb:.1f} MiB (saved {sv / mb:.1f}, "
              f"trainable params {tr / mb:.1f}) | {r} | <= 1.3 |")
    for k in rss:
        d = rss[k]["peak_kb"] - rss[k]["base_kb"]
        r = "1.00" if k == "ar" else f"{rss[k]['peak_kb'] / rss['ar']['peak_kb']:.2f}x AR (delta {d / max(rss['ar']['peak_kb'] - rss['ar']['base_kb'], 1):.2f}x)"
        print(f"| peak RSS (fresh process), {k} | {rss[k]['peak_kb'] / 1024:.0f} MiB (step delta {d / 1024:.0f} MiB) | {r} | <= 1.3 |")


if __name__ == "__main__":
    main()
