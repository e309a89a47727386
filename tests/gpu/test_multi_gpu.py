"""Two GPUs: TP2 and EP2 give the one-GPU loss and denoiser gradients (fp32, NCCL)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]])
def test_tp2_and_ep2_equal_one_gpu(tmp_path, layout):
    import subprocess
    import sys
    from pathlib import Path

    from hf_tiny import tiny_hf_model

    from twotower.model.parallel_init import free_port

    script = Path(__file__).parents[1] / "model" / "dist" / "two_tower_equiv.py"

    ctx, den = tmp_path / "ctx", tmp_path / "den"
    tiny_hf_model("all_types", seed=1).save_pretrained(ctx)
    tiny_hf_model("all_types", seed=2).save_pretrained(den)
    outs = {}
    for name, nproc, args in (("one", 1, []), ("two", 2, layout)):
        outs[name] = tmp_path / f"{name}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(script), *args, "--ctx", str(ctx), "--den", str(den), "--out", str(outs[name])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (torch.load(outs[k]) for k in ("one", "two"))
    assert abs(one["loss"] - two["loss"]) < 1e-5
    for k, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][k], g, atol=1e-4, rtol=1e-3, msg=k)
