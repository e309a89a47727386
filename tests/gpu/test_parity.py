"""Numerics on the GPU: HF parity in bf16, compiled FlexAttention vs SDPA, decoding.

Tolerance of the bf16 HF parity (stated, not tuned): both models run bf16 weights and activations
with fp32 norms / SSM accumulation; on the tiny configs the logits agree to max |d| <= 0.25 and mean
|d| <= 0.03, and the greedy next token on >= 97% of positions. (fp32 on CPU: 1e-4, tests/model.)
"""

from __future__ import annotations

import pytest
import torch
from gpu_cases import CFG, PAR
from hf_tiny import TINY_CONFIGS, tiny_hf_model

from twotower.model.backbone import build_backbone
from twotower.model.config import BackboneConfig
from twotower.model.core_attention import FlexCoreAttention, MaskSpec, SDPACoreAttention
from twotower.model.hf_import import load_hf_backbone

pytestmark = pytest.mark.gpu
MAX_ABS, MEAN_ABS, ARGMAX_AGREE = 0.25, 0.03, 0.97


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_hf_parity_bf16(gpu_world1, name):
    hf = tiny_hf_model(name).to(gpu_world1, torch.bfloat16)
    cfg = BackboneConfig.from_hf(hf.config)
    ours = build_backbone(cfg, PAR, params_dtype=torch.bfloat16).eval()
    load_hf_backbone(ours, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3)).to(gpu_world1)
    with torch.no_grad():
        got = ours(ids).float()
        want = hf(input_ids=ids, use_cache=False).logits.float()
    d = (got - want).abs()
    assert d.max() <= MAX_ABS and d.mean() <= MEAN_ABS, (d.max().item(), d.mean().item())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= ARGMAX_AGREE


@pytest.mark.parametrize("L,S", [(1024, 16), (4096, 16)])
def test_compiled_flex_block_diffusion_mask_equals_sdpa(L, S):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, L, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, 2 * L, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    mask = MaskSpec.block_diffusion(S, L)
    flex = FlexCoreAttention(compile=True)(q, k, v, mask)
    ref = SDPACoreAttention()(q, k, v, mask)
    torch.testing.assert_close(flex.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_decoding_on_the_gpu(gpu_world1):
    """Mock-AR equals AR token for token with a fresh denoiser (the release's plumbing check), and
    mask diffusion decodes a few blocks, on the GPU with the auto backends."""
    from twotower.model.decoding import generate_ar, generate_mask_diffusion, generate_mock_ar
    from twotower.model.two_tower import TwoTowerConfig, build_two_tower

    model = build_two_tower(CFG, PAR, TwoTowerConfig(block_size=16)).eval()
    prompt = torch.randint(4, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)).to(gpu_world1)
    ar = generate_ar(model, prompt, max_new_tokens=12)
    assert torch.equal(generate_mock_ar(model, prompt, max_new_tokens=12).sequences, ar.sequences)
    out = generate_mask_diffusion(model, prompt, max_new_tokens=32, block_size=16, steps_per_block=4)
    assert out.sequences.shape == (2, 9 + 32) and out.sequences.is_cuda and 2 <= out.nfe <= 8
