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
(or srun on SLURM) the same command runs distributed; ``twotower-launch`` submits it as a
self-requeuing SLURM job.

Exit codes (:class:`ExitCode`; a job script decides from them whether to run again):

    0  done: trainer.max_steps reached (or ``--plan`` printed a plan that fits)
    1  crash (an uncaught exception; the full traceback is printed)
    2  configuration error, named key: an unknown key (also with a leading ``+``), a wrong type,
       an unknown experiment or group option, an override below a null node, a value out of
       range; found before any process group exists        rerunning fails the same way
    3  ``--plan``: the layout does not fit                   "
    4  too many non-finite losses in a row                  "
    5  bad input found at start-up or later, named file: a checkpoint, the backbone folder
       (config, safetensors), a dataset (manifest, shard, index, sample, moved directory)  "
    6  stopped early with a checkpoint written, steps left to do: a signal (SIGTERM, SIGUSR1, to
       the trainer or its whole process group), trainer.exit_after_steps or
       trainer.exit_after_minutes. Run the same command to resume.

Process hygiene: helper processes (DataLoader workers, megatron's checkpoint writers) ignore the
scheduler's stop signals and die with the trainer (training/preemption.py, data/workers.py).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys

import hydra
from omegaconf import DictConfig

from twotower.training.quiet import quiet_third_party

quiet_third_party()  # before megatron is imported (its notices fire at import time)

from twotower.model.config import ConfigError
from twotower.training.config import register_configs, to_train_config
from twotower.training.config_keys import composition_error_message


class ExitCode(enum.IntEnum):
    """``twotower-train``'s exit status (the module docstring says what each one means)."""

    DONE = 0
    CONFIG = 2
    PLAN = 3
    NONFINITE = 4
    BAD_INPUT = 5
    STOPPED_EARLY = 6


_PLAN = False
_STOPPED_EARLY: list[str] = []  # one line per Hydra job that stopped early (main() exits 6 after all)
_JOB_ERRORS: list[BaseException] = []  # raised inside a Hydra job (a crash), not by Hydra's composition


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
                gpu=tc.cluster.gpu, gpu_mem_gib=tc.cluster.gpu_mem_gib,
                seq_len=t.seq_len, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                block_size=tc.twotower.block_size,
                token_budget=t.tokens_budget or t.max_steps * t.global_batch_size * t.seq_len,
                distributed_optimizer=tc.optim.distributed_optimizer, recompute=tc.twotower.recompute,
                mfu=tc.cluster.mfu or None, mfu_source=f"cluster.mfu ({tc.cluster.name})" if tc.cluster.mfu else None,
                time_per_block=tc.diffusion.time_per == "block")


@hydra.main(config_path="pkg://twotower.conf", config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    try:
        return _job(cfg)
    except Exception as err:
        _JOB_ERRORS.append(err)
        raise


def _job(cfg: DictConfig) -> float | None:
    try:
        tc = to_train_config(cfg)
        if _PLAN:
            from twotower.training.planner import PlanError

            try:
                report = _plan(tc)
            except PlanError as err:
                print(f"twotower-train --plan: {err}", file=sys.stderr)
                sys.exit(ExitCode.PLAN)
            print(report.table())
            if not report.fits:
                sys.exit(ExitCode.PLAN)
            return None
        batch = tc.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"twotower-train: configuration error: {err}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)

    from twotower.data.shards import DatasetError
    from twotower.model.hf_import import CheckpointKeyError
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.checkpoint import CheckpointError
    from twotower.training.trainer import Trainer, TrainingStopped

    trainer = None
    try:
        _check_inputs(tc, batch.dp)  # the backbone folder and the datasets, before any process group
        trainer = Trainer(tc)
        last = trainer.train()
        if trainer.stopped_early:
            _STOPPED_EARLY.append(f"stopped early at step {trainer.step}/{tc.trainer.max_steps} with a checkpoint "
                                  f"in {tc.checkpoint.dir}")
    except TrainingStopped as err:
        print(f"twotower-train: stopped: {err}", file=sys.stderr)
        sys.exit(ExitCode.NONFINITE)
    except (CheckpointError, CheckpointKeyError, DatasetError, ConfigError) as err:
        # Bad input found after start-up (a checkpoint, the backbone, a dataset): name it, no traceback.
        print(f"twotower-train: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(ExitCode.BAD_INPUT)
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
    return last.get("loss")


def _check_inputs(tc, dp: int) -> None:
    """Read what the run will read first, cheaply: the backbone's config.json and safetensors
    headers (CheckpointKeyError), every dataset's manifest and shard list (DatasetError)."""
    if tc.backbone:
        from twotower.model.hf_import import check_backbone_folder

        check_backbone_folder(tc.backbone, tc.model)
    if tc.data is not None and not tc.trainer.synthetic_data:
        from twotower.data.plan import ReadPlan

        ReadPlan(tc.data, "train", dp)
        if tc.data.valid_path:
            ReadPlan(tc.data, "valid", dp)


def main() -> None:
    global _PLAN
    if "--plan" in sys.argv:
        sys.argv.remove("--plan")
        _PLAN = True
    _slurm_to_torch_env()
    from twotower.model import megatron_cpu

    megatron_cpu.apply()  # the CPU runtime layer (no-op on CUDA hosts); before any megatron world exists
    register_configs()
    from twotower.training.preemption import install_child_policy

    install_child_policy()
    try:
        with _hydra_raises():
            _app()  # returns after every Hydra job ran (a multirun sweep is not cut short by one stop)
    except Exception as err:
        if any(err is e for e in _JOB_ERRORS):
            raise  # a crash inside a job: exit 1 with the traceback
        print(f"twotower-train: configuration error: {composition_error_message(err)}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)
    if _STOPPED_EARLY:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"twotower-train: {'; '.join(_STOPPED_EARLY)}; run the same command to resume "
                  f"(exit {int(ExitCode.STOPPED_EARLY)})", file=sys.stderr)
        sys.exit(ExitCode.STOPPED_EARLY)


@contextlib.contextmanager
def _hydra_raises():
    """Let Hydra raise its composition errors (its documented HYDRA_FULL_ERROR switch) instead of
    printing them and exiting 1, so that main() can exit 2 on them with the key named."""
    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


if __name__ == "__main__":
    main()
