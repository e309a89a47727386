"""The trainer: built in visible stages, then a short loop.

Stages (``Trainer.__init__``): validate the config against the world size -> distributed
(megatron parallel state: TP, SP, EP, PP, DP) -> lock the run and checkpoint directories
(``run_lock.py``: one process per run, writability probed) -> model (both towers, this pipeline
stage's layer range; the context tower loaded from the backbone and frozen) -> megatron
Float16Module + DDP (``wrapping.py``) -> optimizer + LR schedule -> data -> checkpoint (resume) -> metrics.

One step (``train_step``): build this rank's micro-batches (noise and masks seeded by
global sample index, so any layout reproduces the single-rank run) -> megatron's
forward-backward schedule (1F1B under PP, gradient accumulation over micro-batches; DDP
reduces gradients, the schedule calls ``finalize_model_grads``) -> skip the step if any
loss was non-finite -> optimizer step (clipping inside) -> LR step. No checkpoint is written while
non-finite losses are streaking (the weights that produce them would be resumed).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from twotower.model.backbone import build_backbone
from twotower.model.hf_import import load_hf_backbone
from twotower.model.parallel_init import init_parallel
from twotower.model.released_format import load_context_tower
from twotower.model.two_tower import build_two_tower
from twotower.training import flops as flops_lib
from twotower.training.batches import MicroBatch, SyntheticTokens, add_noise, first_sample_index
from twotower.training.checkpoint import Checkpointer
from twotower.training.config import TrainConfig
from twotower.training.diffusion import NoiseSchedule, ValidationStats, validation_config
from twotower.training.metrics import MetricsLogger, supersede_rows_after
from twotower.training.objectives import ar_forward_step, diffusion_forward_step, reduce_stats
from twotower.training.optim import build_optimizer, build_scheduler
from twotower.training.preemption import StopRequest
from twotower.training.resume_policy import check_resumable
from twotower.training.run_lock import lock_run
from twotower.training.wrapping import params_gathered, release_training_wrappers, wrap_for_training


class TrainingStopped(RuntimeError):
    """Raised when training cannot continue (e.g. too many non-finite losses in a row)."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, synthetic: SyntheticTokens | None = None):
        self.cfg = cfg
        # 1. validate before any process group or weight exists
        self.plan = cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
        # 2. distributed
        init_parallel(tp=cfg.parallel.tp, ep=cfg.parallel.ep, pp=cfg.parallel.pp, seed=cfg.trainer.seed,
                      timeout_s=cfg.parallel.timeout_s)
        self.rank = torch.distributed.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        use_bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and torch.cuda.is_available())
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        # one training process per run directory and checkpoint directory (rank 0 holds the lock)
        self._lock = lock_run(cfg.trainer.run_dir, cfg.checkpoint.dir, self.rank)
        try:
            self._setup(cfg, synthetic)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _setup(self, cfg: TrainConfig, synthetic: SyntheticTokens | None) -> None:
        # 3. model (this pipeline stage, built on self.device), 4. megatron's Float16Module + DDP
        self.model = self._build_model()
        self.ddp, self.ddp_config = wrap_for_training(self.model, cfg, self.device, self.dtype)
        # 5. optimizer and schedule
        self.optimizer = build_optimizer(cfg.optim, [self.ddp], self.dtype)
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, cfg.trainer.max_steps)
        mc = self.model.config
        mc.finalize_model_grads_func = finalize_model_grads
        mc.no_sync_func = self.ddp.no_sync
        mc.grad_scale_func = self.optimizer.scale_loss
        # 6. data
        if synthetic is None and cfg.trainer.synthetic_data:
            synthetic = SyntheticTokens(cfg.model.vocab_size, cfg.trainer.seq_len, cfg.trainer.seed)
        self.synthetic = synthetic
        self.train_loader = self.valid_loader = None
        if synthetic is None:
            from twotower.data.loader import build_train_loader, build_valid_loader

            self.train_loader = build_train_loader(cfg.data, self.dp_rank, self.plan.dp, self.plan.micro_batch_size,
                                                   seed=cfg.trainer.seed)
            self._train_iter = iter(self.train_loader)
            if cfg.data.valid_path:
                self.valid_loader = build_valid_loader(cfg.data, self.dp_rank, self.plan.dp, self.plan.micro_batch_size)
        # 7. checkpoint / resume
        self.step, self.consumed_tokens, self.skipped, self._nonfinite_streak = 0, 0, 0, 0
        self._last_eval_step, self.stopped_early = -1, False
        self.checkpointer = Checkpointer(cfg.checkpoint)
        extra = self.checkpointer.load(self.model, self.optimizer, self.scheduler, check=self._check_resumable)
        if extra:
            self._restore(extra)
        elif cfg.checkpoint.init_from:
            self.checkpointer.load_weights(self.model, cfg.checkpoint.init_from)
            if self.rank == 0:
                print(f"initialised the model from {cfg.checkpoint.init_from} (weights only; fresh optimizer, "
                      "step 0)", flush=True)
        # 8. metrics (global rank 0 writes)
        self.run_dir = Path(cfg.trainer.run_dir)
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            dropped = supersede_rows_after(self.run_dir / "metrics.jsonl", self.step)
            if dropped:  # e.g. a crash between saves, a damaged newest checkpoint, resume=none
                print(f"[twotower] metrics.jsonl: {dropped} row(s) after step {self.step} (not in the checkpoint "
                      "this run starts from) moved to metrics.superseded.jsonl", flush=True)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, enabled=self.rank == 0, config=resolved,
                                     max_steps=cfg.trainer.max_steps, start_step=self.step)
        self.schedule = NoiseSchedule(cfg.diffusion.schedule)
        self.flops_per_step = self._flops_per_step()

    # ------------------------------------------------------------------ stages
    def _build_model(self):
        cfg = self.cfg
        pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        n = cfg.model.num_layers
        kw = dict(params_dtype=self.dtype, device=self.device, pre_process=stage == 0, post_process=stage == pp - 1,
                  layer_range=(stage * n // pp, (stage + 1) * n // pp))
        torch.manual_seed(cfg.trainer.seed)
        if cfg.objective == "ar":
            model = build_backbone(cfg.model, cfg.parallel, **kw)
            if cfg.backbone:
                load_hf_backbone(model, cfg.backbone)
        else:
            model = build_two_tower(cfg.model, cfg.parallel, cfg.twotower, **kw)
            if cfg.backbone:  # a NemotronH folder, or a released TwoTower's context tower
                load_context_tower(model.context_tower, cfg.backbone)
                model.init_denoiser_from_context()
        # On CUDA the embeddings count out-of-range ids on the device (read at log intervals,
        # _check_token_ids) instead of a host sync per micro-batch.
        for tower in self._towers(model):
            tower.defer_id_check = self.device.type == "cuda"
        return model

    @staticmethod
    def _towers(model) -> list:
        return [model] if not hasattr(model, "denoiser_tower") else [model.context_tower, model.denoiser_tower]

    def _check_token_ids(self) -> None:
        """Raise if any embedding saw an out-of-range id since the last check (one host read)."""
        bad = sum(t.take_bad_id_count() for t in self._towers(self.model) if t.pre_process)
        if bad:
            raise TrainingStopped(f"{bad} token id(s) outside [0, model.vocab_size={self.cfg.model.vocab_size}) "
                                  f"in the steps before {self.step}; check the data's tokenizer / vocab_size")

    def _check_resumable(self, path, extra: dict) -> None:
        """Another model, objective or diffusion geometry: refused by field name before any tensor
        is read; changed optimizer / schedule / batch settings: announced, they apply (resume_policy.py)."""
        check_resumable(path, extra, OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True),
                        announce=self.rank == 0)

    def _restore(self, extra: dict) -> None:
        self.step = int(extra["step"])
        self.consumed_tokens = int(extra.get("consumed_tokens", 0))
        self.skipped = int(extra.get("skipped_steps", 0))
        states = extra.get("data")
        if self.train_loader is not None and states:
            if len(states) != self.plan.dp:
                print(f"[twotower] resuming with data-parallel size {self.plan.dp} (checkpoint: {len(states)}); "
                      f"data.on_dp_change={self.cfg.data.on_dp_change} decides what the loader does", flush=True)
            self.train_loader.load_state_dict(states[min(self.dp_rank, len(states) - 1)])
            self._train_iter = iter(self.train_loader)

    def _flops_per_step(self) -> float:
        c, t = self.cfg, self.cfg.trainer
        tokens = self.plan.global_batch_size * t.seq_len
        if c.objective == "ar":
            return flops_lib.ar_step_flops(c.model, t.seq_len, tokens)
        return flops_lib.twotower_step_flops(c.model, t.seq_len, c.twotower.block_size, tokens,
                                             recompute=c.twotower.recompute).total

    # ------------------------------------------------------------------ data
    def _tokens(self, first_index: int) -> torch.Tensor:
        if self.synthetic is not None:
            return self.synthetic.micro_batch(first_index, self.plan.micro_batch_size)
        return next(self._train_iter)["tokens"]

    def _micro_batches(self, step: int, tokens_fn, diffusion_cfg) -> list[MicroBatch]:
        out = []
        for m in range(self.plan.num_microbatches):
            first = first_sample_index(step, m, self.dp_rank, self.plan)
            mb = MicroBatch(tokens_fn(first).long(), first)
            if self.cfg.objective == "diffusion":
                add_noise(mb, step, self.plan, diffusion_cfg, self.cfg.twotower.block_size,
                          self.cfg.twotower.mask_token_id, self.cfg.trainer.seed, self.schedule)
            for name in ("x0", "xt", "t", "masked"):
                if getattr(mb, name) is not None:
                    setattr(mb, name, getattr(mb, name).to(self.device))
            out.append(mb)
        return out

    def _run_schedule(self, micro: list[MicroBatch], forward_only: bool, ar_nll: bool = False) -> dict[str, float]:
        c = self.cfg
        if c.objective == "ar":
            step_fn, seq = ar_forward_step, c.trainer.seq_len
        else:
            step_fn = functools.partial(diffusion_forward_step, schedule=self.schedule,
                                        weighting="nelbo" if forward_only else c.diffusion.loss_weighting,
                                        block_size=c.twotower.block_size, ar_nll=ar_nll)
            seq = 2 * c.trainer.seq_len  # the (context ; denoiser) pair travels between stages
        per_micro = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(micro), model=[self.ddp],
            num_microbatches=len(micro), seq_length=seq, micro_batch_size=self.plan.micro_batch_size,
            forward_only=forward_only,
        )
        groups = [ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group()]
        return reduce_stats(list(per_micro or []), groups)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, float]:
        micro = self._micro_batches(self.step, self._tokens, self.cfg.diffusion)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        # megatron updates the MoE routers' score-correction bias inside finalize_model_grads,
        # before we know whether the step is kept: snapshot it so a skipped step changes nothing.
        biases = [(b, b.detach().clone()) for name, b in self.model.named_buffers() if name.endswith("expert_bias")]
        s = self._run_schedule(micro, forward_only=False)
        out = {"loss": s["objective_sum"] / max(s["micro_batches"], 1), "lr": self.scheduler.get_lr(self.optimizer.param_groups[0])}
        if self.cfg.objective == "diffusion" and s["masked"]:
            out["masked_ce"] = s["masked_ce_sum"] / s["masked"]
            out["mask_rate"] = s["masked"] / s["tokens"]
        if s["nonfinite"] > 0:  # every rank sees the same reduced flag: all skip together
            self.skipped += 1
            with torch.no_grad():
                for buf, saved in biases:
                    buf.copy_(saved)
            self._nonfinite_streak += 1
            out.update(loss=float("nan"), grad_norm=float("nan"), skipped_steps=self.skipped)
            if "masked_ce" in out:
                out["masked_ce"] = float("nan")
            if self._nonfinite_streak >= self.cfg.trainer.max_consecutive_nonfinite:
                n, last = self._nonfinite_streak, self.step + 1  # steps counted from 1, as logged
                raise TrainingStopped(f"{n} non-finite losses in a row, steps {last - n + 1}-{last} "
                                      f"(trainer.max_consecutive_nonfinite={self.cfg.trainer.max_consecutive_nonfinite});"
                                      f" no checkpoint was written during them, a relaunch resumes from "
                                      f"{self.checkpointer.latest() or 'scratch'}; lower optim.lr or check the data")
        else:
            self._nonfinite_streak = 0
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        self.step += 1
        self.consumed_tokens += self.plan.global_batch_size * self.cfg.trainer.seq_len
        out["tokens"] = self.consumed_tokens
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Unbiased NELBO over t ~ U[eps, 1] (bits/token, perplexity bound) and, beside it, the
        frozen context tower's AR NLL on the same tokens. The stream is the same every time."""
        c = self.cfg
        with params_gathered(self.ddp, self.ddp_config):
            return self._evaluate(c)

    def _evaluate(self, c) -> dict[str, float]:
        self.ddp.eval()
        if self.valid_loader is not None:
            it = iter(self.valid_loader)  # a fresh, fixed, unshuffled pass every time
            tokens_fn = (lambda _first: next(it)["tokens"])
        else:  # synthetic: a fixed set of samples far from the training indices
            tokens_fn = (lambda first: self.synthetic.micro_batch(10**9 + first, self.plan.micro_batch_size))
        totals: dict[str, float] = {}
        for k in range(max(1, c.trainer.eval_batches // self.plan.num_microbatches)):
            try:
                micro = self._micro_batches(10**6 + k, tokens_fn, validation_config(c.diffusion))
            except StopIteration:
                break
            for key, v in self._run_schedule(micro, forward_only=True, ar_nll=True).items():
                totals[key] = totals.get(key, 0.0) + v
        self.ddp.train()
        self._last_eval_step = self.step
        if c.objective == "ar":
            stats = ValidationStats(ar_nll_sum=totals.get("ar_nll_sum", 0.0), ar_tokens=int(totals.get("ar_tokens", 0)))
            return {k: v for k, v in stats.summary().items() if k.startswith("val/ar")}
        stats = ValidationStats(totals.get("loss_sum", 0.0), int(totals.get("tokens", 0)),
                                totals.get("ar_nll_sum", 0.0), int(totals.get("ar_tokens", 0)))
        return stats.summary()

    def save(self) -> None:
        data = None
        if self.train_loader is not None:
            data = [None] * self.plan.dp
            torch.distributed.all_gather_object(data, self.train_loader.state_dict(), group=ps.get_data_parallel_group())
        extra = {"step": self.step, "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped,
                 "data": data, "diffusion_clip": [self.cfg.diffusion.t_min, self.cfg.diffusion.t_max],
                 "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)}
        with params_gathered(self.ddp, self.ddp_config):
            path = self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                                          json.loads(json.dumps(extra)))
        if self.rank == 0:
            print(f"[twotower] saved checkpoint {path}", flush=True)

    def _save_unless_diverging(self) -> None:
        """No checkpoint while non-finite losses are streaking: its weights produce them, and a
        relaunch (e.g. with a lower LR) must resume from before the streak."""
        if not self._nonfinite_streak:
            self.save()
        elif self.rank == 0:
            print(f"[twotower] step {self.step}: no checkpoint during {self._nonfinite_streak} non-finite "
                  f"loss(es) in a row; the newest stays {self.checkpointer.latest()}", flush=True)

    def describe(self) -> str:
        """One start-up line: what is trained, on which layout, with which batch, where it logs."""
        c, t, p = self.cfg, self.cfg.trainer, self.cfg.parallel
        total = sum(x.numel() for x in self.model.parameters())
        trainable = sum(x.numel() for x in self.model.parameters() if x.requires_grad)
        data = "synthetic sequences" if self.synthetic is not None else ", ".join(
            f"{d.path} (w={d.weight:g})" for d in c.data.train)
        start = f"resumed at step {self.step}" if self.step else "fresh start"
        return (f"[twotower] {c.objective} | {total / 1e6:.2f}M params on this rank, {trainable / 1e6:.2f}M trained "
                f"| TP{p.tp} PP{p.pp} EP{p.ep} DP{self.plan.dp} | batch {self.plan.global_batch_size} x {t.seq_len} "
                f"tokens ({self.plan.num_microbatches} micro-batches of {self.plan.micro_batch_size}) | "
                f"{t.max_steps} steps | {self.dtype} on {self.device} | data: {data} | {start} | run dir {self.run_dir}")

    def train(self) -> dict[str, float]:
        t = self.cfg.trainer
        if self.rank == 0:
            print(self.describe(), flush=True)
        window_t0, window_tokens = time.perf_counter(), self.consumed_tokens
        n_dev = torch.distributed.get_world_size()
        peak = t.peak_flops_per_device or None
        if peak is None and torch.cuda.is_available():
            peak = flops_lib.peak_flops(torch.cuda.get_device_name(), "bf16" if self.dtype == torch.bfloat16 else "fp32")
        stop = StopRequest(self.device)
        self.stopped_early = False
        self._launch_step, self._launch_t0 = self.step, time.perf_counter()
        try:
            last = self._loop(t, peak, n_dev, stop, window_t0, window_tokens)
        finally:
            stop.restore()
        interval = self.cfg.checkpoint.interval
        saved_in_loop = bool(interval) and self.step % interval == 0
        # the last step is saved (always when stopped early: the next launch resumes from it),
        # unless the loop just did, or this launch trained no step at all
        if (interval or self.stopped_early) and not saved_in_loop and self.step > self._launch_step:
            self._save_unless_diverging()
        if not self.stopped_early and self._last_eval_step != self.step and self._has_validation():
            last |= self.evaluate()  # the final model is always validated
            self.metrics.log(self.step, {k: v for k, v in last.items() if k.startswith("val/")})
        return last

    def _has_validation(self) -> bool:
        return self.valid_loader is not None or self.synthetic is not None

    def _loop(self, t, peak, n_dev, stop, window_t0, window_tokens) -> dict[str, float]:
        last: dict[str, float] = {}
        while self.step < t.max_steps:
            last = self.train_step()
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self._check_token_ids()
                dt = time.perf_counter() - window_t0
                steps_in_window = max((self.consumed_tokens - window_tokens)
                                      // (self.plan.global_batch_size * t.seq_len), 1)
                last["tokens_per_s"] = (self.consumed_tokens - window_tokens) / max(dt, 1e-9)
                last["tflops_per_device"] = self.flops_per_step * steps_in_window / max(dt, 1e-9) / n_dev / 1e12
                if peak:  # CPUs have no datasheet peak: MFU only when trainer.peak_flops_per_device is set
                    last["mfu"] = flops_lib.mfu(self.flops_per_step, dt / steps_in_window, n_dev, peak)
                last["skipped_steps"] = self.skipped
                self.metrics.log(self.step, last)
                window_t0, window_tokens = time.perf_counter(), self.consumed_tokens
            if t.eval_interval and self.step % t.eval_interval == 0:
                val = self.evaluate()
                last |= val
                self.metrics.log(self.step, val)
            if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0:
                self._save_unless_diverging()
            by_steps = bool(t.exit_after_steps) and self.step - self._launch_step >= t.exit_after_steps
            by_time = bool(t.exit_after_minutes) and time.perf_counter() - self._launch_t0 >= 60 * t.exit_after_minutes
            if stop.requested(by_steps or by_time):
                self.stopped_early = self.step < t.max_steps
                if self.rank == 0 and self.stopped_early:
                    why = (f"signal {stop.signal_name}" if stop.signal_name else
                           f"trainer.exit_after_steps={t.exit_after_steps}" if by_steps else
                           f"trainer.exit_after_minutes={t.exit_after_minutes}")
                    print(f"[twotower] stopping at step {self.step}/{t.max_steps} ({why}); "
                          "relaunch the same command to resume", flush=True)
                break
        return last

    def close(self) -> None:
        """End of the run: files and lock released; the model and optimizer become collectable."""
        self.metrics.close()
        release_training_wrappers(self.model, self.ddp)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

