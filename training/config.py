"""The training configuration schema (Hydra structured configs) and its validation.

Stage: before anything else. Input: the Hydra-composed config (``conf/config.yaml`` with
groups ``model/ parallel/ data/ diffusion/ optim/ trainer/ logging/ cluster/ experiment/``
and command-line overrides; the ``launch.*`` keys are read by ``twotower-launch`` only).
Output: a validated ``TrainConfig`` of dataclasses. Types are
checked by OmegaConf against this schema (unknown keys are rejected, also those added with a
leading ``+``: training/config_keys.py), ranges and cross-field rules by the ``__post_init__``
methods and ``TrainConfig.validate(world_size)``, all before a process group or a weight exists.
Every error names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from twotower.data.config import DataConfig
from twotower.model.config import BackboneConfig, ConfigError, ParallelConfig
from twotower.model.two_tower import TwoTowerConfig
from twotower.training.checkpoint import CheckpointConfig
from twotower.training.config_keys import composition_error_message, unknown_keys
from twotower.training.diffusion import DiffusionConfig


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    """Where ``metrics.jsonl``, the resolved config and logs go (checkpoints default below it)."""
    max_steps: int = 100
    """Optimizer steps to run (a resumed run continues up to this step)."""
    seq_len: int = 256
    """Tokens per sequence (must equal the data's ``seq_len``; a multiple of the block size)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward pass per rank; accumulation = global / (micro * dp)."""
    seed: int = 1234
    """Seeds weights (when not loaded), noise, masks and data order."""
    precision: str = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    log_interval: int = 10
    """Steps between console / metrics.jsonl / wandb lines."""
    eval_interval: int = 0
    """Steps between validations (0: never, except at the end when a valid set exists)."""
    eval_batches: int = 4
    """Micro-batches per rank per validation."""
    max_consecutive_nonfinite: int = 5
    """Stop after this many non-finite losses in a row (each one skips its step)."""
    tokens_budget: float = 0.0
    """Optional token budget for the ETA (0: use max_steps)."""
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device for MFU (0: detect the GPU from its datasheet; on CPU no MFU is logged)."""
    synthetic_data: bool = False
    """Train on deterministic synthetic sequences instead of ``data`` (smoke runs, layout checks)."""
    exit_after_steps: int = 0
    """Stop cleanly (checkpoint; ``twotower-train`` exits 6) after this many steps of this launch
    although the LR schedule runs to ``max_steps``; relaunching the same command resumes (0: off)."""
    exit_after_minutes: float = 0.0
    """The same after this many minutes of this launch (e.g. the job's time limit minus the time a
    checkpoint takes; 0: off). SIGTERM and SIGUSR1 also stop at the end of the current step."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"trainer.precision={self.precision!r}: use 'auto', 'fp32' or 'bf16'")
        if self.exit_after_steps < 0 or self.exit_after_minutes < 0:
            raise ConfigError("trainer.exit_after_steps and trainer.exit_after_minutes must be >= 0")
        for name in ("max_steps", "seq_len", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be positive")
        if self.eval_interval < 0 or self.eval_batches < 0 or self.max_consecutive_nonfinite < 1:
            raise ConfigError("trainer.eval_interval/eval_batches must be >= 0, max_consecutive_nonfinite >= 1")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 10
    schedule: str = "cosine"
    """LR after warmup: cosine to ``min_lr``; warmup-stable-decay; or constant."""
    decay_steps: int = 0
    """Steps over which the LR decays (0: ``trainer.max_steps``)."""
    wsd_decay_fraction: float = 0.1
    """WSD: fraction of the decay steps spent in the final (linear) decay."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron DistributedOptimizer)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= optim.min_lr ({self.min_lr}) <= optim.lr ({self.lr}), lr > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ConfigError("optim.wsd_decay_fraction must be in (0, 1]")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r}: use 'cosine', 'wsd' or 'constant'")
        for name in ("lr", "min_lr", "weight_decay", "eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be a finite number")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0 (0: no weight decay)")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps={self.eps} must be > 0")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0: no clipping)")


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline by default: no account needed)."""
    wandb_mode: str = "offline"
    wandb_project: str = "twotower"
    wandb_entity: str | None = None
    run_name: str | None = None
    """Defaults to the run directory's name."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r}: use 'offline', 'online' or 'disabled'")


@dataclass
class ClusterConfig:
    """Where jobs run: ``twotower-launch`` turns it into a local ``torchrun`` (``scheduler: local``)
    or a self-requeuing sbatch job (``scheduler: slurm``). Site names and absolute paths belong
    only in ``conf/cluster/``; ``twotower-train`` itself reads nothing here but the GPU count
    (``--plan``)."""

    name: str = "local"
    """The preset's name (job records, ``twotower-launch status``)."""
    scheduler: str = "local"
    """``local``: torchrun on this machine; ``slurm``: sbatch + ``srun``, one task per GPU."""
    nodes: int = 1
    gpus_per_node: int = 0
    """0: CPU (gloo)."""
    tasks_per_node: int = 0
    """Training processes per node (0: one per GPU, or 1 on a CPU node). With GPUs it must be
    ``gpus_per_node``: one rank per GPU."""
    cpus_per_node: int = 0
    """CPU cores to request per node; SLURM gets ``--cpus-per-task`` = this / tasks (0: site default)."""
    mem: str | None = None
    """SLURM ``--mem`` per node (``"0"``: all of the node's memory; None: site default)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    """Wall-clock limit of one job segment (SLURM ``--time``: ``[D-]HH:MM:SS``, ``HH:MM``, ``MM``)."""
    exclusive: bool = False
    """SLURM ``--exclusive``: no other job shares the nodes."""
    gpu: str = "H100"
    """GPU model for the planner's peak FLOP/s (``twotower.training.flops.PEAK_FLOPS``)."""
    gpu_mem_gib: float = 80.0
    """Memory of one GPU for the planner (it refuses layouts that do not fit)."""
    mfu: float = 0.0
    """Model FLOPs utilisation the planner's step time assumes, measured on this cluster's GPU with
    ``tests/benchmarks/bench_gpu_mfu.py`` (0: the planner's documented assumption,
    ``twotower.training.planner.ASSUMED_MFU``)."""
    container_image: str | None = None
    """pyxis/enroot image: ``srun --container-image`` (None: run on the host, see ``setup``)."""
    container_mounts: list[str] = field(default_factory=list)
    """``src:dst`` pairs for ``srun --container-mounts`` (data, checkpoints, the run directory)."""
    python: str | None = None
    """Interpreter that runs the training (None: ``python`` inside a container or after ``setup``
    lines, else the launcher's own interpreter)."""
    env: dict[str, str] = field(default_factory=dict)
    """Exported in the job before the training starts (NCCL / CUDA settings)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (module loads, virtualenv activation)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` options of the site, as ``--key=value`` (e.g. ``--constraint=h100``)."""
    srun_args: list[str] = field(default_factory=list)
    """Extra ``srun`` options, as ``--key=value`` (e.g. ``--cpu-bind=none``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mfu <= 1.0:
            raise ConfigError(f"cluster.mfu={self.mfu} must be in [0, 1] (0: the planner's assumption)")
        if self.scheduler not in ("local", "slurm"):
            raise ConfigError(f"cluster.scheduler={self.scheduler!r}: use 'local' or 'slurm'")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.tasks_per_node < 0 or self.cpus_per_node < 0:
            raise ConfigError("cluster.nodes must be >= 1; gpus_per_node, tasks_per_node, cpus_per_node >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"cluster.tasks_per_node={self.tasks_per_node} with cluster.gpus_per_node="
                              f"{self.gpus_per_node}: one training process per GPU (set it to 0 or "
                              f"{self.gpus_per_node})")
        if self.scheduler == "local" and self.nodes != 1:
            raise ConfigError(f"cluster.nodes={self.nodes} with cluster.scheduler=local: a local run uses this "
                              "machine only (choose a SLURM preset, e.g. cluster=slurm_h100)")
        for name in ("sbatch_args", "srun_args"):
            bad = [a for a in getattr(self, name) if not a.startswith("--") or "=" not in a]
            if bad:
                raise ConfigError(f"cluster.{name}: write options as --key=value, got {bad}")

    @property
    def procs_per_node(self) -> int:
        """Training processes per node (one per GPU; ``tasks_per_node`` or 1 on CPU)."""
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass
class LaunchConfig:
    """How ``twotower-launch`` submits this run (``twotower-train`` ignores it). Example::

        twotower-launch experiment=twotower_nano_2p1t launch.dry_run=true
    """

    dry_run: bool = False
    """Print the job script, the plan and the resolved config; write and submit nothing."""
    chain: int = 0
    """0: one job that requeues itself (``--requeue``, ``scontrol requeue``) until training ends;
    N >= 1: N segments chained with ``--dependency=afterany`` and no requeue (clusters that forbid it)."""
    signal_seconds: int = 300
    """SLURM sends SIGUSR1 this long before the time limit (``--signal=B:USR1@N``); one step plus one
    checkpoint save must fit in it, or the segment is killed and loses the steps since the last save."""
    max_failures: int = 3
    """Stop requeuing after this many consecutive segments that end without a new checkpoint."""
    job_name: str | None = None
    """SLURM job name (None: ``tt-<run dir name>-<hash of its path>``). With ``--dependency=singleton``
    at most one job of this name runs at a time, so two segments never train the same run dir."""
    plan: bool = True
    """Run the memory planner before submitting and refuse layouts that do not fit (GPU clusters)."""

    def __post_init__(self) -> None:
        if self.chain < 0:
            raise ConfigError(f"launch.chain={self.chain} must be >= 0 (0: one self-requeuing job)")
        if self.signal_seconds < 1:
            raise ConfigError(f"launch.signal_seconds={self.signal_seconds} must be >= 1")
        if self.max_failures < 1:
            raise ConfigError(f"launch.max_failures={self.max_failures} must be >= 1")


@dataclass
class TrainConfig:
    objective: str = "diffusion"
    """``diffusion``: train the denoiser tower on a frozen context tower; ``ar``: train one
    backbone with next-token loss (the baseline, and how the CPU demo makes its backbone)."""
    backbone: str | None = None
    """Hugging Face NemotronH checkpoint both towers start from (None: random init, tests)."""
    model: BackboneConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    twotower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    data: DataConfig | None = None
    """Token shards (``twotower-tokenize`` output); may be null with ``trainer.synthetic_data``."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        if self.objective not in ("diffusion", "ar"):
            raise ConfigError(f"objective={self.objective!r}: use 'diffusion' or 'ar'")
        _check_checkpoint(self.checkpoint)
        if self.data is not None and self.data.vocab_size is None and isinstance(self.model, BackboneConfig):
            # every sample is then checked against the model's vocabulary, also when the dataset's
            # manifest records none: an id past the embedding table is named with its shard and key
            self.data.vocab_size = self.model.vocab_size

    def validate(self, world_size: int, check_host: bool = True) -> BatchPlan:
        """Cross-group rules; returns the derived batch arithmetic. ``check_host``: also refuse
        backends this host cannot run (``parallel.transformer_impl`` etc.; off where a job is only
        submitted, e.g. ``twotower-launch`` on a login node)."""
        self.model.validate_parallel(self.parallel)
        if check_host:
            self.parallel.check_host()
        dp = self.parallel.data_parallel_size(world_size)
        if self.parallel.pp > 1 and self.model.num_layers % self.parallel.pp:
            raise ConfigError(f"parallel.pp={self.parallel.pp} does not divide the {self.model.num_layers} layers "
                              "of model.pattern (each stage holds the same number of layers of both towers)")
        if self.data is None and not self.trainer.synthetic_data:
            raise ConfigError("data is not set: choose a data group (e.g. data=demo) or trainer.synthetic_data=true")
        if self.data is not None and self.data.seq_len != self.trainer.seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} differs from trainer.seq_len={self.trainer.seq_len}")
        if self.objective == "diffusion":
            self.twotower.validate(self.model, self.trainer.seq_len)
        if self.parallel.sequence_parallel and self.parallel.tp > 1:
            L = self.trainer.seq_len * (2 if self.objective == "diffusion" and self.parallel.pp > 1 else 1)
            if L % self.parallel.tp:
                raise ConfigError(f"trainer.seq_len={self.trainer.seq_len} must be divisible by parallel.tp="
                                  f"{self.parallel.tp} under sequence parallelism")
        if self.data is not None and self.data.vocab_size is not None and self.data.vocab_size != self.model.vocab_size:
            raise ConfigError(f"data.vocab_size={self.data.vocab_size} differs from model.vocab_size="
                              f"{self.model.vocab_size}")
        return BatchPlan.derive(self.trainer.global_batch_size, self.trainer.micro_batch_size, dp)


def _check_checkpoint(c: CheckpointConfig) -> None:
    """``checkpoint.*`` ranges (CheckpointConfig lives with the checkpointer, in checkpoint.py)."""
    if c.interval < 0:
        raise ConfigError(f"checkpoint.interval={c.interval} must be >= 0 (0: only when stopped early)")
    if c.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last} must be >= 0 (0: keep every checkpoint)")
    if not str(c.dir).strip():
        raise ConfigError("checkpoint.dir is empty")
    if not str(c.resume).strip():
        raise ConfigError("checkpoint.resume is empty: use auto, none or a checkpoint folder")
    if c.optimizer_sharding not in ("fully_reshardable", "dp_reshardable"):
        raise ConfigError(f"checkpoint.optimizer_sharding={c.optimizer_sharding!r}: use 'fully_reshardable' or "
                          "'dp_reshardable'")
    if c.async_save:
        raise ConfigError("checkpoint.async_save=true: only synchronous saves are implemented")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, derived in one place from the global batch and the DP size."""

    global_batch_size: int
    micro_batch_size: int
    dp: int
    num_microbatches: int

    @classmethod
    def derive(cls, global_batch: int, micro_batch: int, dp: int) -> BatchPlan:
        if global_batch <= 0 or micro_batch <= 0:
            raise ConfigError("trainer.global_batch_size and trainer.micro_batch_size must be positive")
        if global_batch % (micro_batch * dp):
            raise ConfigError(
                f"trainer.global_batch_size={global_batch} is not divisible by trainer.micro_batch_size="
                f"{micro_batch} x data-parallel size {dp}; use a multiple of {micro_batch * dp}")
        return cls(global_batch, micro_batch, dp, global_batch // (micro_batch * dp))


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (``config_schema``, used by conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=TrainConfig)


def to_train_config(cfg: Any) -> TrainConfig:
    """A Hydra/OmegaConf node (or dict) -> validated ``TrainConfig`` (runs every ``__post_init__``)."""
    try:
        if not OmegaConf.is_config(cfg):
            cfg = OmegaConf.create(cfg)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    except OmegaConfBaseException as err:  # a wrong type, an unknown key in a plain dict
        raise ConfigError(composition_error_message(err)) from err
    unknown = unknown_keys(merged)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {'; '.join(unknown)}: keys are checked "
                          "against the schema in twotower.training.config (a leading '+' does not add a field)")
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
        raise ConfigError(composition_error_message(err)) from err
    except (ValueError, TypeError) as err:  # __post_init__ errors (ConfigError and DataConfig's ValueError)
        raise ConfigError(str(err).split("\n")[0]) from err
    return obj
