"""On a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them): float32 parity with the CPU, the
float32 fall-back of an overflowing float16 / bfloat16 decode, the feature cache, and dtype="auto"."""

from __future__ import annotations

import warnings

import pytest
import torch

from ldmkit import DiffusionPipeline

pytestmark = pytest.mark.cuda
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32 here: cuDNN's convolutions default to TF32 (10-bit mantissa) on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _load(folder, device, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, steps=4, output_type="pt") -> torch.Tensor:
    """The pipeline from one x_T drawn on the CPU (the same start on every device), DDIM with eta 0."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, eta=0.0, output_type=output_type,
                latents=latents.to(pipe.device, pipe.unet.dtype)).images.float().cpu()


def test_float32_on_cuda_matches_the_cpu(tiny_text2img_dir):
    cpu = _run(_load(tiny_text2img_dir, "cpu"))
    gpu = _run(_load(tiny_text2img_dir, "cuda"))
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def _overflow_in(pipe, dtype) -> None:
    """Make the decoder overflow in ``dtype`` only. float16: channel 0 of the last convolution at float16's
    largest value, so that any positive rest is inf (float32 stays finite). bfloat16 has float32's range, so
    no weights overflow one and not the other: a hook turns the bf16 output's first pixel into inf."""
    conv = pipe.vqvae.decoder.conv_out
    if dtype == torch.float16:
        with torch.no_grad():
            conv.weight.mul_(100.0)
            conv.bias[0] = torch.finfo(torch.float16).max
    else:
        def overflow(module, args, output):
            if output.dtype == torch.bfloat16:
                output = output.clone()
                output[:, :, 0, 0] = float("inf")
            return output
        conv.register_forward_hook(overflow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overflowing_half_decode_falls_back_to_float32_on_cuda(tiny_text2img_dir, dtype):
    pipe = _load(tiny_text2img_dir, "cuda")
    _overflow_in(pipe, dtype)
    latents = _run(pipe, output_type="latent").to("cuda")
    pipe.vqvae.to(dtype).float()  # from here the weights are exact in both dtypes
    expected = pipe.decode(latents)  # the float32 decoder: finite, clamped to [0, 1]
    pipe.vqvae.to(dtype)
    raw = pipe.vqvae.decode(latents.to(dtype) / pipe.vqvae.config.scaling_factor).sample
    assert not torch.isfinite(raw).all()  # the decoder really overflows in this dtype
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe.decode(latents)
    assert any("float32" in str(w.message) for w in caught) and pipe.vqvae.dtype == dtype
    assert torch.isfinite(images).all() and torch.equal(images, expected)


def test_feature_cache_on_cuda(tiny_text2img_dir):
    pipe = _load(tiny_text2img_dir, "cuda")
    reference = _run(pipe, steps=6)
    cache = pipe.enable_feature_cache(interval=1)
    assert torch.equal(_run(pipe, steps=6), reference) and cache.calls == {"full": 6, "shallow": 0}
    cache = pipe.enable_feature_cache(interval=3)
    cached = _run(pipe, steps=6)
    assert cache.calls == {"full": 2, "shallow": 4} and not torch.equal(cached, reference)
    cpu = _load(tiny_text2img_dir, "cpu")
    cpu.enable_feature_cache(interval=3)
    torch.testing.assert_close(cached, _run(cpu, steps=6), atol=1e-4, rtol=1e-4)  # the same cache as on the CPU
    pipe.disable_feature_cache()
    assert torch.equal(_run(pipe, steps=6), reference)


def test_auto_dtype_on_cuda(tiny_text2img_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, torch_dtype="auto", device_map="cuda")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float16 and pipe.bert.dtype == torch.float16
    # diffusers' AutoencoderKL says force_upcast: bf16 where the GPU has it, else float32
    assert pipe.vqvae.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    images = _run(pipe)
    reference = _run(_load(tiny_text2img_dir, "cuda"))
    assert torch.isfinite(images).all() and (images - reference).abs().max() < 0.05
