"""Importing twotower changes nothing global: the CPU runtime layer is applied by entry points only.

Runs in a fresh interpreter (this test session already applied the layer in ``conftest.py``):
snapshot torch's patchable attributes, import every module of every twotower package, compare.
The same script then applies the layer and checks the snapshot *does* change (the check can fail).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, torch
    import torch._dynamo  # torch's own: wraps torch.manual_seed when first imported (by megatron)

    OWNERS = {"torch": torch, "torch.cuda": torch.cuda, "torch.cuda.random": torch.cuda.random,
              "torch.Tensor": torch.Tensor}

    def snapshot():
        return {f"{o}.{n}": id(getattr(obj, n)) for o, obj in OWNERS.items() for n in dir(obj)
                if not n.startswith("__") and callable(getattr(obj, n, None))}

    def changed(before):
        after = snapshot()
        return sorted(k for k in before if k in after and after[k] != before[k])

    before = snapshot()
    imported = []
    for pkg in ("twotower.model", "twotower.data", "twotower.training", "twotower.launch"):
        mod = importlib.import_module(pkg)
        imported.append(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if info.name.endswith(".__main__"):  # `python -m` entry points run on import
                continue
            importlib.import_module(info.name)
            imported.append(info.name)
    assert "twotower.model.backbone" in imported and "twotower.training.trainer" in imported, imported
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from twotower.model import megatron_cpu
    diff = changed(before)
    assert not diff, f"importing twotower patched: {diff}"
    assert megatron_cpu.applied_patches() == [], megatron_cpu.applied_patches()
    assert not hasattr(DistributedOptimizer.load_state_dict, "__wrapped__")
    rng = mrandom._set_cuda_rng_state
    print("IMPORTED", len(imported))
    if not torch.cuda.is_available():  # control: applying the layer is seen by the same check
        megatron_cpu.apply()
        assert "torch.cuda.current_device" in changed(before) and mrandom._set_cuda_rng_state is not rng
        print("CONTROL_OK")
""")


def test_importing_twotower_patches_nothing():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "IMPORTED" in proc.stdout
    import torch

    assert torch.cuda.is_available() or "CONTROL_OK" in proc.stdout
