"""``twotower-train``: the Hydra application that trains the denoiser (or an AR backbone).

Examples (every key is a Hydra override, validated before any process group exists)::

    twotower-train experiment=smoke_cpu                          # < 1 min on 2 CPU cores
    twotower-train experiment=demo backbone=runs/demo/backbone_hf trainer.max_steps=500
    torchrun --nproc_per_node 2 -m twotower.training.train experiment=smoke_cpu parallel=tp2
    twotower-train experiment=twotower_nano_2p1t cluster.nodes=64 --plan   # memory / time plan
    twotower-train -m experiment=smoke_cpu optim.lr=1e-3,3e-3 'trainer.run_dir=runs/sweep/${optim.lr}'

Keys users touch most: ``trainer.max_steps``, ``trainer.run_dir`` (metrics.jsonl, the resolved
config, logs), ``checkpoint.dir``, ``checkpoint.interval``, ``checkpoint.resume=auto|PATH|none``,
``objective=diffusion|ar``, ``parallel.tp``, ``parallel.ep``, ``parallel.pp``. Under torchrun
(or srun on SLURM) the same command runs distributed.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from twotower.training.quiet import quiet_third_party

quiet_third_party()  # before megatron is imported (its notices fire at import time)

from twotower.model.config import ConfigError
from twotower.training.config import register_configs, to_train_config

_PLAN = False


def _slurm_to_torch_env() -> None:
    """Under ``srun`` (one task per GPU) derive torch.distributed's variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
        first = nodes.split(",")[0]
        if "[" in first:  # node[001-004] -> node001
            base, rng = first.split("[", 1)
            first = base + rng.split("-")[0].split(",")[0].rstrip("]")
        os.environ["MASTER_ADDR"] = first


def _plan(tc):
    """The memory / throughput plan of this config on its cluster (``cluster.nodes x gpus_per_node``)."""
    from twotower.training.planner import plan

    t = tc.trainer
    return plan(tc.model, tc.parallel, num_gpus=tc.cluster.nodes * max(tc.cluster.gpus_per_node, 1),
                seq_len=t.seq_len, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                block_size=tc.twotower.block_size,
                token_budget=t.tokens_budget or t.max_steps * t.global_batch_size * t.seq_len,
                distributed_optimizer=tc.optim.distributed_optimizer, recompute=tc.twotower.recompute)


@hydra.main(config_path="pkg://twotower.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    try:
        tc = to_train_config(cfg)
        if _PLAN:
            from twotower.training.planner import PlanError

            try:
                report = _plan(tc)
            except PlanError as err:
                print(f"twotower-train --plan: {err}", file=sys.stderr)
                sys.exit(3)
            print(report.table())
            if not report.fits:
                sys.exit(3)
            return None
        tc.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"twotower-train: configuration error: {err}", file=sys.stderr)
        sys.exit(2)

    from twotower.data.shards import BadSampleError
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.model.megatron_cpu import destroy_parallel
    from twotower.training.checkpoint import CheckpointError
    from twotower.training.trainer import Trainer, TrainingStopped

    trainer = None
    try:
        trainer = Trainer(tc)
        last = trainer.train()
    except TrainingStopped as err:
        print(f"twotower-train: stopped: {err}", file=sys.stderr)
        sys.exit(4)
    except (CheckpointError, CheckpointKeyError, BadSampleError, ConfigError) as err:
        # Bad input found after start-up (a checkpoint, the backbone, a shard): name it, no traceback.
        print(f"twotower-train: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(5)
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
    return last.get("loss")


def main() -> None:
    global _PLAN
    if "--plan" in sys.argv:
        sys.argv.remove("--plan")
        _PLAN = True
    _slurm_to_torch_env()
    register_configs()
    _app()


if __name__ == "__main__":
    main()
