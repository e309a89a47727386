"""torchrun worker: a few training steps at some layout; rank 0 writes the loss curve.

    torchrun --nproc_per_node 2 tests/training/dist/train_layout.py OUT.json override [override ...]
"""

import json
import sys
from pathlib import Path


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from train_helpers import compose

    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    trainer = Trainer(compose(*overrides))
    losses, grad_norms = [], []
    while trainer.step < trainer.cfg.trainer.max_steps:
        row = trainer.train_step()
        losses.append(row["loss"])
        grad_norms.append(row["grad_norm"])
    ctx = trainer.model.context_tower.state_dict() if hasattr(trainer.model, "context_tower") else {}
    import torch

    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": losses, "grad_norms": grad_norms, "ctx_sum": float(sum(
            v.double().sum() for k, v in ctx.items() if torch.is_tensor(v) and v.is_floating_point()))}))
    trainer.close()
    destroy_parallel()


if __name__ == "__main__":
    main()
