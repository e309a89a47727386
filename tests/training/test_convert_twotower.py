"""``twotower-convert`` with whole TwoTowers: a released-format folder in, our checkpoint, the
released layout out (loaded by plain transformers through our remote code), and a trained
run's export decoding exactly like the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from hf_tiny import tiny_hf_model
from released_reference import ReleasedTwoTower
from test_hf_remote import load_released, random_adaln, write_released_folder

from twotower.model.decoding import generate_ar, generate_mask_diffusion, generate_mock_ar
from twotower.training.convert import main as convert

MASK = 3
REPO = Path(__file__).parents[2]


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out |= load_file(str(folder / f))
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-format folder: random context, a different denoiser, non-trivial adaLN, 2 shards."""
    root = tmp_path_factory.mktemp("released")
    ctx, den = tiny_hf_model("all_types", seed=31), tiny_hf_model("all_types", seed=32)
    adaln = random_adaln(ctx.config.hidden_size, 6, seed=4)
    adaln = {k: (v * 4 if k.startswith("scale_shift") else v) for k, v in adaln.items()}
    return write_released_folder(root / "hf", ctx, den, adaln, shards=2)


@pytest.fixture(scope="module")
def imported(released):
    out = released.parent / "ckpt"
    assert convert(["import-hf", "--hf", str(released), "--output", str(out), "--block-size", "4"]) == 0
    return out


def test_released_folder_imports_to_the_reference_function(released, imported):
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.inference_model import load_for_inference

    reference = ReleasedTwoTower(json.loads((released / "config.json").read_text()), _folder_tensors(released))
    try:
        model = load_for_inference(checkpoint=str(imported), backbone=str(released)).model
        g = torch.Generator().manual_seed(3)
        prefix, block = torch.randint(4, 96, (2, 8), generator=g), torch.randint(4, 96, (2, 4), generator=g)
        block[:, 1:3] = MASK
        t = torch.full((2,), 0.5)
        with torch.no_grad():
            _, cache = model.context_forward(prefix)
            ours = model.denoise_block(block, t, cache)
        ref = reference.denoise_block(block, t, reference.prefill(prefix))
        keep = torch.arange(96) != MASK
        assert (ours[..., keep] - ref[..., keep]).abs().max().item() <= 1e-4
        kw = dict(max_new_tokens=8, block_size=4, steps_per_block=4, mask_token_id=MASK, confidence_threshold=0.3)
        got = generate_mask_diffusion(model, prefix, **kw)
        want, nfe = reference.generate_mask_diffusion(prefix, **kw)
        assert torch.equal(got.sequences, want) and got.nfe == nfe
    finally:
        destroy_parallel()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_reproduces_the_released_layout(released, imported, tmp_path, dtype):
    out = tmp_path / "export"
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--dtype", dtype,
                    "--backbone", str(released), "--verify"]) == 0
    src, got = _folder_tensors(released), _folder_tensors(out)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in src.items()}
    cast = torch.float32 if dtype == "fp32" else torch.bfloat16
    for k, v in src.items():
        expect = v if k.endswith("e_score_correction_bias") else v.to(cast)
        assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["NemotronHTwoTowerForCausalLM"] and cfg["hybrid_override_pattern"] == "M*E-ME"
    assert "layers_block_type" not in cfg and set(cfg["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert (out / "generation_config.json").exists() and (out / "modeling_nemotron_twotower.py").exists()


def test_verify_names_the_first_mismatching_tensor(imported, released, tmp_path, monkeypatch, capsys):
    from twotower.model import safetensors_writer

    add = safetensors_writer.ShardedSafetensorsWriter.add

    def corrupt(self, name, tensor):
        add(self, name, tensor + 1 if name == "scale_shift_tables.2" else tensor)

    monkeypatch.setattr(safetensors_writer.ShardedSafetensorsWriter, "add", corrupt)
    out = tmp_path / "export"
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--backbone", str(released),
                    "--verify"]) == 5
    assert "tensor scale_shift_tables.2 differs" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.slow
def test_a_trained_run_exports_and_decodes_like_its_checkpoint(tmp_path):
    """A few training steps, then export: the exported model's three greedy decoders give the
    checkpoint's tokens (what twotower-generate prints for it)."""
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.inference_model import load_for_inference
    hf = tmp_path / "backbone"
    tiny_hf_model("all_types", seed=41).save_pretrained(hf)
    run = tmp_path / "run"
    model_keys = ["model.pattern=M*E-ME", "model.vocab_size=96", "model.hidden_size=32", "model.head_dim=8",
                  "model.num_attention_heads=4", "model.num_query_groups=2", "model.mamba_num_heads=4",
                  "model.mamba_head_dim=8", "model.mamba_num_groups=2", "model.mamba_state_dim=8",
                  "model.mamba_chunk_size=8", "model.ffn_hidden_size=48", "model.num_experts=4",
                  "model.moe_topk=2", "model.moe_ffn_hidden_size=16", "model.moe_shared_expert_intermediate_size=24",
                  "model.moe_routed_scaling_factor=1.5"]  # no dt clamp (the release's default)
    cmd = [sys.executable, "-m", "twotower.training.train", "experiment=smoke_cpu", f"backbone={hf}",
           f"trainer.run_dir={run}", "trainer.max_steps=6", "trainer.seq_len=32", "twotower.block_size=4",
           "checkpoint.interval=6", "trainer.eval_interval=0", "diffusion=release", "optim.lr=1e-2", *model_keys]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, WORLD_SIZE="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    assert convert(["export-hf", "--checkpoint", str(run / "checkpoints"), "--output", str(out),
                    "--dtype", "fp32"]) == 0
    exported, info = load_released(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    prompt = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(7))
    try:
        model = load_for_inference(run=str(run)).model
        kw = dict(block_size=4, steps_per_block=4, mask_token_id=MASK, confidence_threshold=0.8)
        ours = generate_mask_diffusion(model, prompt, 8, **kw).sequences
        theirs = exported.generate_mask_diffusion(prompt, max_new_tokens=8, **kw)
        assert torch.equal(ours, theirs)
        assert torch.equal(generate_mock_ar(model, prompt, 8).sequences, exported.generate_mock_ar(prompt, 8))
        assert torch.equal(generate_ar(model, prompt, 8).sequences, exported.generate_ar(prompt, 8))
        # training changed the denoiser: it no longer mirrors the context tower
        assert not torch.equal(generate_mock_ar(model, prompt, 8).sequences, generate_ar(model, prompt, 8).sequences)
    finally:
        destroy_parallel()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]], ids=["tp2", "ep2"])
def test_import_at_another_layout_writes_the_same_checkpoint(torchrun, released, imported, tmp_path, layout):
    """Each rank reads only its slices of the released folder; the checkpoint's content equals
    the single-process import (itself checked against the reference above)."""
    from twotower.model.parallel_init import destroy_parallel
    from twotower.training.inference_model import load_for_inference

    torchrun(REPO / "training" / "convert.py", nproc=2,
             args=["import-hf", "--hf", str(released), "--output", str(tmp_path / "ck"), "--block-size", "4", *layout])
    states = []
    for ckpt in (imported, tmp_path / "ck"):
        try:
            states.append(load_for_inference(checkpoint=str(ckpt)).model.state_dict())
        finally:
            destroy_parallel()
    a, b = states
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    # the denoiser is the released one, not a copy of the context tower
    assert not torch.equal(a["denoiser_tower.embedding.word_embeddings.weight"],
                           a["context_tower.embedding.word_embeddings.weight"])


def test_generate_cli_reads_checkpoints_and_exports_alike(released, imported, tmp_path, capsys):
    """twotower-generate on the imported checkpoint and on its export: the same greedy ids, and
    --stats prints one JSON line per mode with the counters."""
    from twotower.training.generate import main as generate

    out = tmp_path / "export"
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--dtype", "fp32",
                    "--backbone", str(released)]) == 0
    capsys.readouterr()
    common = ["--input-ids", "5,17,42,9", "--mode", "all", "--max-new-tokens", "8", "--gamma", "0.3",
              "--stats", "--output-ids"]
    rows = {}
    for source in (["--checkpoint", str(imported), "--backbone", str(released)], ["--hf", str(out)]):
        assert generate([*source, *common]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert [r["mode"] for r in lines] == ["diffusion", "mock_ar", "ar"]
        for r in lines:
            assert r["tokens"] == len(r["ids"]) == 8 and r["nfe"] >= 1
            assert r["tokens_per_nfe"] == pytest.approx(r["tokens"] / r["nfe"], rel=1e-3)
            assert set(r) == {"mode", "tokens", "nfe", "tokens_per_nfe", "seconds", "tokens_per_s", "ids"}
        rows[source[0]] = [r["ids"] for r in lines]
    assert rows["--checkpoint"] == rows["--hf"]
    with pytest.raises(SystemExit) as e:  # this export has no tokenizer: text prompts are refused
        generate(["--hf", str(out), "--prompt", "hello"])
    assert e.value.code == 2 and "records no tokenizer: give --input-ids" in capsys.readouterr().err


@pytest.mark.distributed
def test_export_at_tp2_writes_the_same_folder(torchrun, released, imported, tmp_path):
    one, two = tmp_path / "tp1", tmp_path / "tp2"
    assert convert(["export-hf", "--checkpoint", str(imported), "--output", str(one), "--backbone", str(released),
                    "--max-shard-size", "0.00005"]) == 0
    torchrun(REPO / "training" / "convert.py", nproc=2,
             args=["export-hf", "--checkpoint", str(imported), "--output", str(two), "--backbone", str(released),
                   "--max-shard-size", "0.00005", "--tp", "2"])
    a, b = _folder_tensors(one), _folder_tensors(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(set(json.loads((two / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2


def test_unexpected_key_is_named_with_its_shard(released, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(released, bad)
    shard = "model-00002-of-00002.safetensors"
    tensors = load_file(str(bad / shard)) | {"t_block.9.weight": torch.zeros(2)}
    save_file(tensors, str(bad / shard))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["t_block.9.weight"] = shard
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert(["import-hf", "--hf", str(bad), "--output", str(tmp_path / "o")]) == 5
    assert f"unexpected in checkpoint: t_block.9.weight (in {shard})" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
