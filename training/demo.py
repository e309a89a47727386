"""``twotower-demo``: the whole pipeline end to end on a CPU, in a few minutes.

    twotower-demo                      # everything under runs/demo/
    twotower-demo --out /tmp/demo --ar-steps 300 --steps 300

Stages (each is the real code path a cluster run uses, at toy scale):

1. data: generate a learnable synthetic corpus and tokenize it into webdataset shards
   with the byte tokenizer (``twotower-tokenize``'s code);
2. backbone: pretrain a tiny Nemotron-H autoregressively (``objective=ar``) and export it
   to a Hugging Face ``NemotronHForCausalLM`` folder;
3. TwoTower: initialise both towers from that folder, train the denoiser for half the
   steps, stop, then resume from the distributed checkpoint to the end (as after a
   preemption);
4. report: validation NELBO (bits/token) next to the frozen context tower's AR NLL;
5. export: the trained TwoTower as a released-layout Hugging Face folder with our remote code
   (``twotower-convert export-hf --verify``: reloaded with plain transformers and compared);
6. generate: decode prompts with the trained TwoTower in the release's three modes (diffusion
   with confidence threshold 0.8, mock-AR, AR) and print tokens/s and tokens per denoiser forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(overrides: list[str]) -> dict:
    """One training run in this process (a fresh megatron parallel state each time)."""
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.trainer import Trainer

    cfg = _compose(overrides)
    trainer = Trainer(cfg)
    try:
        return {"trainer": trainer, "last": trainer.train()}  # train() validates the final model
    finally:
        trainer.close()
        destroy_parallel()


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from twotower.training.config import register_configs, to_train_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="twotower.conf", version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=overrides))


def _export(out: Path, overrides: list[str]) -> Path:
    """Load the AR run's last checkpoint and write it as a Hugging Face folder."""
    from twotower.model.backbone import build_backbone
    from twotower.model.hf_export import save_hf_checkpoint
    from twotower.model.parallel_init import destroy_parallel, init_parallel
    from twotower.training.checkpoint import Checkpointer

    cfg = _compose(overrides + ["checkpoint.resume=auto"])
    init_parallel()
    try:
        model = build_backbone(cfg.model, cfg.parallel)
        if Checkpointer(cfg.checkpoint).load(model, None, None) is None:
            raise SystemExit(f"no checkpoint under {cfg.checkpoint.dir}")
        return save_hf_checkpoint(model, out, extra_config={"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0})
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="where data, runs and exports go")
    ap.add_argument("--ar-steps", type=int, default=200, help="AR pretraining steps of the backbone")
    ap.add_argument("--steps", type=int, default=200, help="denoiser training steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    from twotower.training.quiet import quiet_third_party

    quiet_third_party()
    from twotower.model import megatron_cpu

    megatron_cpu.apply()  # the CPU runtime layer (no-op on CUDA hosts), before megatron is imported
    import shutil

    for stale in ("ar", "twotower", "backbone_hf"):  # a previous demo's runs would be resumed
        if (out / stale).exists():
            print(f"[demo] removing the previous demo's {out / stale}", flush=True)
            shutil.rmtree(out / stale)

    from twotower.data.synthetic import prepare_demo_data

    print(f"[demo 1/6] data: synthetic corpus -> byte-tokenized webdataset shards in {out / 'data'}", flush=True)
    data = prepare_demo_data(out / "data", seq_len=256)
    common = [f"data.train.0.path={data}", f"data.valid_path={data}", "logging=none"]

    print(f"[demo 2/6] backbone: AR pretraining of a tiny Nemotron-H for {args.ar_steps} steps", flush=True)
    ar = common + ["experiment=demo_ar", f"trainer.run_dir={out / 'ar'}", f"trainer.max_steps={args.ar_steps}",
                   f"checkpoint.interval={args.ar_steps}"]
    ar_res = _run(ar)["last"]
    backbone = _export(out / "backbone_hf", ar)
    print(f"           exported the backbone to {backbone} (Hugging Face NemotronHForCausalLM)", flush=True)

    half = max(1, args.steps // 2)
    tt = common + ["experiment=demo", f"backbone={backbone}", f"trainer.run_dir={out / 'twotower'}",
                   f"checkpoint.interval={half}"]
    tt += [f"trainer.max_steps={args.steps}"]
    print(f"[demo 3/6] TwoTower: train the denoiser, stop at step {half} as if preempted (checkpoint), "
          "then resume", flush=True)
    _run(tt + [f"trainer.exit_after_steps={half}", "checkpoint.resume=none"])
    res = _run(tt + ["checkpoint.resume=auto"])["last"]

    print("[demo 4/6] results", flush=True)
    summary = {
        "backbone_val_ar_nll": ar_res.get("val/ar_nll"),
        "twotower_val_nelbo": res.get("val/nelbo"),
        "twotower_val_bits_per_token": res.get("val/bits_per_token"),
        "context_tower_val_ar_nll": res.get("val/ar_nll"),
        "backbone_hf": str(backbone),
        "checkpoints": str(out / "twotower" / "checkpoints"),
    }
    print(json.dumps(summary, indent=2), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("[demo 5/6] export the TwoTower (twotower-convert export-hf --verify)", flush=True)
    from twotower.training.convert import main as convert

    export = out / "twotower_hf"
    if convert(["export-hf", "--checkpoint", str(out / "twotower" / "checkpoints"), "--output", str(export),
                "--overwrite", "--verify"]) != 0:
        raise SystemExit("[demo] the export failed (see above)")
    print(f"           {export}: AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) loads it; "
          "verified against the checkpoint", flush=True)

    print("[demo 6/6] generate from the trained TwoTower (twotower-generate --run ... --mode all)", flush=True)
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.generate import main as generate

    try:
        generate(["--run", str(out / "twotower"), "--mode", "all", "--max-new-tokens", "48",
                  "--prompt-file", str(_prompts(out))])
    finally:
        destroy_parallel()


def _prompts(out: Path) -> Path:
    path = out / "prompts.txt"
    # in the style of the demo corpus (data/synthetic.py): sentences, sums, counting
    path.write_text("the small cat sees\ncount: 12 13 14\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
