"""Benchmark ``ssd_chunk_scan`` (torch backend) against a token-by-token loop and HF's
``mamba2_chunk_scan`` (nemotron_h torch path), all measured in one run on the current device.

    python tests/benchmarks/bench_ssd.py [--l 2048] [--heads 8] [--backward]

Prints per-call CPU time (``time.process_time``, best of ``--reps``; robust to other processes on a
shared machine, and with the default ``--threads 1`` equal to wall time on an idle one) and ratios;
no assertions on time (machine dependent).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from twotower.model.ssd import ssd_chunk_scan


def sequential(x, dt, A, B, C, D, dt_bias):
    """The recurrence one token at a time (what a decode loop would do over a whole prompt)."""
    b, l, h, p = x.shape
    r = h // B.shape[2]
    dt = F.softplus(dt.float() + dt_bias)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32)
    ys = []
    for t in range(l):
        Bt, Ct = B[:, t].repeat_interleave(r, 1), C[:, t].repeat_interleave(r, 1)
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct) + D[:, None] * x[:, t])
    return torch.stack(ys, 1)


def timeit(fn, backward: bool, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        out = fn()
        if backward:
            out.square().sum().backward()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--l", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--state", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, l, h, g, p, n = args.b, args.l, args.heads, args.groups, args.head_dim, args.state
    x, dt = torch.randn(b, l, h, p), torch.randn(b, l, h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    A, D, dt_bias = -torch.rand(h) - 0.5, torch.randn(h), torch.randn(h)
    if args.backward:
        x.requires_grad_()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, b={b} l={l} h={h} g={g} p={p} n={n} "
          f"chunk={args.chunk}, {'fwd+bwd' if args.backward else 'fwd'}")

    ours = lambda S=None: ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=args.chunk, D=D, dt_bias=dt_bias, state_every=S, backend="torch").y
    hf = lambda: mamba2_chunk_scan(x, dt, A, B, C, args.chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    t_ours = timeit(ours, args.backward, args.reps)
    t_hf = timeit(hf, args.backward, args.reps)
    t_seq = timeit(lambda: sequential(x, dt, A, B, C, D, dt_bias), args.backward, 1)
    rows = [("ssd_chunk_scan", t_ours), ("HF mamba2_chunk_scan", t_hf), ("sequential loop", t_seq)]
    for S in (16, 64, 4 * args.chunk):
        if l % S == 0:
            rows.append((f"ssd_chunk_scan state_every={S}", timeit(lambda S=S: ours(S), args.backward, args.reps)))
    for name, t in rows:
        print(f"{name:34s} {t * 1e3:9.1f} ms")
    print(f"ratio ssd_chunk_scan / sequential loop : {t_ours / t_seq:.4f}  ({t_seq / t_ours:.1f}x faster)")
    print(f"ratio ssd_chunk_scan / HF mamba2_chunk_scan: {t_ours / t_hf:.3f}  ({t_hf / t_ours:.2f}x faster)")


if __name__ == "__main__":
    main()
