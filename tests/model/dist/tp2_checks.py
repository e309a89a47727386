"""torchrun worker (2 ranks, gloo): megatron TP=2 numerics and the all_to_all split-size patch.

1. ColumnParallelLinear -> RowParallelLinear (TP=2) equals torch Linear -> Linear built from the same
   full weights: forward output, input grad and weight/bias grads (fp32, atol 1e-5), without and with
   sequence_parallel.
2. megatron's ``all_to_all`` with split sizes given as tensors (as the alltoall MoE dispatcher passes
   them on CPU) equals the list version, forward and backward; the unpatched forward fails on tensors.
Prints ``TP2_OK`` when every check passed.
"""

from __future__ import annotations

# the CPU runtime layer must be applied before megatron is imported: keep this import order
# isort: off
from twotower.model import megatron_cpu, parallel_init

megatron_cpu.apply()  # explicit: importing twotower.model patches nothing

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, all_to_all
from megatron.core.transformer import TransformerConfig

# isort: on

S, B, H, F = 8, 3, 12, 20  # seq, batch, hidden, ffn
ATOL = 1e-5


def close(name, got, want):
    err = (got - want).abs().max().item()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= ATOL, f"{name}: max abs err {err:.3e} > {ATOL}"


def check_tp_linear(sequence_parallel: bool) -> None:
    rank, tp = parallel_state.get_tensor_model_parallel_rank(), 2
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    w1, b1 = torch.randn(F, H, generator=g), torch.randn(F, generator=g)
    w2, b2 = torch.randn(H, F, generator=g), torch.randn(H, generator=g)
    x_full = torch.randn(S, B, H, generator=g)
    dy_full = torch.randn(S, B, H, generator=g)

    # reference: plain torch
    ref1, ref2 = torch.nn.Linear(H, F), torch.nn.Linear(F, H)
    with torch.no_grad():
        ref1.weight.copy_(w1), ref1.bias.copy_(b1), ref2.weight.copy_(w2), ref2.bias.copy_(b2)
    xr = x_full.clone().requires_grad_()
    yr = ref2(torch.nn.functional.gelu(ref1(xr)))
    (yr * dy_full).sum().backward()

    cfg = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True, params_dtype=torch.float32,
    )  # fmt: skip
    init = torch.nn.init.zeros_
    fc1 = ColumnParallelLinear(H, F, config=cfg, init_method=init, bias=True, gather_output=False)
    fc2 = RowParallelLinear(
        F, H, config=cfg, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    f, s = F // tp, S // tp
    with torch.no_grad():
        fc1.weight.copy_(w1[rank * f : (rank + 1) * f]), fc1.bias.copy_(b1[rank * f : (rank + 1) * f])
        fc2.weight.copy_(w2[:, rank * f : (rank + 1) * f]), fc2.bias.copy_(b2)

    seq = slice(rank * s, (rank + 1) * s) if sequence_parallel else slice(None)
    x = x_full[seq].clone().requires_grad_()
    h, _ = fc1(x)
    y, _ = fc2(torch.nn.functional.gelu(h))
    (y * dy_full[seq]).sum().backward()

    tag = "sp" if sequence_parallel else "tp"
    close(f"{tag} output", y, yr[seq].detach())
    close(f"{tag} input grad", x.grad, xr.grad[seq])
    close(f"{tag} fc1.weight grad", fc1.weight.grad, ref1.weight.grad[rank * f : (rank + 1) * f])
    close(f"{tag} fc1.bias grad", fc1.bias.grad, ref1.bias.grad[rank * f : (rank + 1) * f])
    close(f"{tag} fc2.weight grad", fc2.weight.grad, ref2.weight.grad[:, rank * f : (rank + 1) * f])
    b2_grad = fc2.bias.grad.clone()
    if sequence_parallel:  # partial per rank; megatron's finalize_model_grads all-reduces it over TP
        assert getattr(fc2.bias, "sequence_parallel", False)
        torch.distributed.all_reduce(b2_grad, group=parallel_state.get_tensor_model_parallel_group())
    close(f"{tag} fc2.bias grad", b2_grad, ref2.bias.grad)


def check_all_to_all() -> None:
    rank, group = torch.distributed.get_rank(), parallel_state.get_tensor_model_parallel_group()
    # rank r sends (r + 1) * (dst + 1) rows to dst; row value = 100 * src + 10 * dst + i
    send = [(rank + 1) * (d + 1) for d in range(2)]
    recv = [(src + 1) * (rank + 1) for src in range(2)]
    rows = [100 * rank + 10 * d + i for d in range(2) for i in range(send[d])]
    x = torch.tensor(rows, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    want = torch.tensor(
        [100 * src + 10 * rank + i for src in range(2) for i in range(recv[src])], dtype=torch.float32
    )

    outs = {}
    for kind, conv in {"list": list, "tensor": torch.tensor}.items():
        xi = x.clone().requires_grad_()
        out = all_to_all(group, xi, conv(recv), conv(send))
        (out * (1 + torch.arange(out.shape[0])).unsqueeze(1)).sum().backward()
        outs[kind] = (out.detach(), xi.grad)
    assert torch.equal(outs["list"][0][:, 0], want), (outs["list"][0][:, 0], want)
    assert torch.equal(outs["tensor"][0], outs["list"][0]), "all_to_all output: tensor splits != list splits"
    assert torch.equal(outs["tensor"][1], outs["list"][1]), "all_to_all grad: tensor splits != list splits"

    # the patch is what makes tensors work: megatron's original forward rejects them on CPU/gloo
    from megatron.core.tensor_parallel.mappings import _AllToAll

    orig = megatron_cpu._ORIG["mcore._AllToAll.forward"]

    class Ctx:
        pass

    try:
        orig(Ctx(), group, x, torch.tensor(recv), torch.tensor(send))
    except (TypeError, RuntimeError, ValueError):
        unpatched_ok = False
    else:
        unpatched_ok = True
    assert _AllToAll.forward is not orig
    print(f"rank{rank} unpatched_all_to_all_with_tensor_splits_works={unpatched_ok}", flush=True)


def main() -> None:
    parallel_init.init_parallel(tp=2, seed=1)
    check_tp_linear(sequence_parallel=False)
    check_tp_linear(sequence_parallel=True)
    check_all_to_all()
    torch.distributed.barrier()
    print(f"rank{torch.distributed.get_rank()} TP2_OK", flush=True)
    parallel_init.destroy_parallel()


if __name__ == "__main__":
    main()
