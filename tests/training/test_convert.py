"""``twotower-convert``: HF <-> TwoTower checkpoints (import, export, bad input, layouts, memory)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from hf_tiny import tiny_hf_model

from twotower.training.convert import main as convert


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "hf"
    tiny_hf_model("all_types", seed=11).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(hf_dir):
    out = hf_dir.parent / "ckpt"
    assert convert(["import-hf", "--hf", str(hf_dir), "--output", str(out), "--block-size", "4"]) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_backbone_round_trip_through_import_and_export(hf_dir, imported, tmp_path):
    from transformers import NemotronHForCausalLM

    out = tmp_path / "export"
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--backbone-only",
                    "--dtype", "fp32", "--verify"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / f).exists() for f in set(index["weight_map"].values()))
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    before = NemotronHForCausalLM.from_pretrained(hf_dir).float().eval()
    after = NemotronHForCausalLM.from_pretrained(out).float().eval()
    assert (_logits(before, ids) - _logits(after, ids)).abs().max().item() <= 1e-5
    assert not list(tmp_path.glob(".export.tmp-*"))


def test_imported_checkpoint_records_the_model_and_its_source(hf_dir, imported):
    from twotower.training.checkpoint import find_checkpoint
    from twotower.training.inference_model import saved_model_config

    ckpt = find_checkpoint(imported)
    assert ckpt.name == "step_00000000"
    backbone, twotower, src, tokenizer = saved_model_config(ckpt)
    assert Path(src) == hf_dir.resolve()
    assert backbone.pattern == "M*E-ME" and twotower.block_size == 4 and tokenizer is None
    extra = json.loads((ckpt / "extra.json").read_text())["extra"]
    assert extra["source_kind"] == "nemotron_h"


def test_export_refuses_to_overwrite_and_keeps_the_old_folder(imported, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("a good folder")
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--backbone-only"]) == 5
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "a good folder"


@pytest.mark.parametrize("case", ["not_nemotron", "incomplete_ckpt", "bad_mask_id", "big_tokenizer",
                                  "missing_key"])
def test_bad_input_is_named(case, hf_dir, imported, tmp_path, capsys):
    if case == "not_nemotron":
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                                 "architectures": ["LlamaForCausalLM"]}))
        rc, msg = convert(["import-hf", "--hf", str(tmp_path / "x"), "--output", str(tmp_path / "o")]), \
            "model_type='llama', architectures=['LlamaForCausalLM']"
    elif case == "incomplete_ckpt":
        broken = tmp_path / "ck" / "step_00000005"
        broken.mkdir(parents=True)
        rc, msg = convert(["export-hf", "--checkpoint", str(broken), "--output", str(tmp_path / "o")]), \
            "is incomplete: missing the COMPLETE marker"
    elif case == "bad_mask_id":
        rc, msg = convert(["import-hf", "--hf", str(hf_dir), "--output", str(tmp_path / "o"),
                           "--mask-token-id", "999"]), "twotower.mask_token_id=999 is outside the vocabulary"
    elif case == "big_tokenizer":
        from tokenizers import Tokenizer, models

        tok_dir = tmp_path / "tok"
        tok_dir.mkdir()
        Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)}, unk_token="w0")).save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
        rc, msg = convert(["export-hf", "--checkpoint", str(imported), "--output", str(tmp_path / "o"),
                           "--tokenizer", str(tok_dir)]), "does not fit the model's vocab_size 96"
    else:
        from safetensors.torch import load_file, save_file

        bad = tmp_path / "hf"
        bad.mkdir()
        (bad / "config.json").write_text((hf_dir / "config.json").read_text())
        sd = load_file(str(hf_dir / "model.safetensors"))
        sd.pop("backbone.layers.0.mixer.dt_bias")
        save_file(sd, str(bad / "model.safetensors"))
        rc, msg = convert(["import-hf", "--hf", str(bad), "--output", str(tmp_path / "o")]), \
            "missing in checkpoint: layers.0.mixer.dt_bias"
    assert rc in (2, 5)
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_streaming_writer_holds_about_two_shards(tmp_path):
    """Export memory: N bytes of tensors, produced one at a time, never raise RSS by more than a
    small multiple of the shard size (the writer flushes a shard before it overflows)."""
    import psutil

    from twotower.model.safetensors_writer import ShardedSafetensorsWriter

    shard, tensor_mb, n = 16 * 2**20, 4, 64  # 256 MiB in 4 MiB tensors, 16 MiB shards
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.0005)

    writer = ShardedSafetensorsWriter(tmp_path / "out", max_shard_bytes=shard)
    base = proc.memory_info().rss
    t = threading.Thread(target=sample)
    t.start()
    try:
        for i in range(n):
            writer.add(f"w{i}", torch.full((tensor_mb * 2**18,), float(i)))  # fp32: 4 MiB
        index = writer.close()
    finally:
        stop.set()
        t.join()
    total = n * tensor_mb * 2**20
    assert index["metadata"]["total_size"] == total
    assert len(set(index["weight_map"].values())) == total // shard
    growth = peak[0] - base
    assert growth < 4 * shard, f"RSS grew by {growth / 2**20:.0f} MiB for {total / 2**20:.0f} MiB written"


def test_ar_run_exports_as_the_backbone_it_trained(tmp_path):
    """An ``objective=ar`` run's checkpoint -> a NemotronHForCausalLM folder whose logits are the
    trained backbone's (loaded the way the trainer saved it); without --backbone-only it is refused."""
    import os
    import subprocess

    from transformers import NemotronHForCausalLM

    from twotower.model.backbone import build_backbone
    from twotower.model.parallel_init import destroy_parallel, init_parallel
    from twotower.training.checkpoint import Checkpointer
    from twotower.training.config import to_train_config

    repo, run = Path(__file__).parents[2], tmp_path / "ar"
    cmd = [sys.executable, "-m", "twotower.training.train", "experiment=smoke_cpu", "objective=ar",
           f"trainer.run_dir={run}", "trainer.max_steps=4", "trainer.seq_len=32", "checkpoint.interval=4",
           "trainer.eval_interval=0", "optim.lr=1e-2"]
    proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, WORLD_SIZE="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "hf"
    assert convert(["export-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(out)]) == 5
    assert not out.exists()
    assert convert(["export-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(out),
                    "--backbone-only", "--backbone", str(tmp_path)]) == 5
    assert convert(["export-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(out),
                    "--backbone-only", "--dtype", "fp32", "--verify"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)

    import yaml

    train_cfg = to_train_config(yaml.safe_load((run / "config.yaml").read_text()))
    init_parallel()
    try:
        ours = build_backbone(train_cfg.model, train_cfg.parallel).eval()
        assert Checkpointer(train_cfg.checkpoint).load(ours, None, None) is not None
        ids = torch.randint(4, train_cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expect = ours(ids).float()
    finally:
        destroy_parallel()
    hf = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(hf, ids) - expect).abs().max() < 1e-4
