"""diffusers' memory helpers on the bundled pipelines, side by side with diffusers where it runs: CPU offload
(components on the CPU between calls, on the offload device only while they run), attention slicing (same
images, bounded attention memory), autoencoder tiling and slicing (close images, lower peak memory) and the
xformers switch (a warning: SDPA does its job).

This machine may have no GPU: the offload tests use ``device="cpu"`` as the "accelerator" and watch the moves
the hooks make; the tests marked ``cuda`` check the real placement when a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit import DiffusionPipeline
from ldmkit.errors import LDMKitError
from ldmkit.loading.bundled import DEFAULT_SUPERRES, DEFAULT_TEXT2IMG, bundled_folder
from ldmkit.models import DecoderOutput, UNet2DConditionOutput
from ldmkit.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from ldmkit.models.ldmbert import LDMBertOutput
from ldmkit.pipelines.memory import _find_device, _to_device
from ldmkit.pipelines.pipeline_utils import ImagePipelineOutput
from memory_probe import PeakMemory

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without an accelerator")
STEPS = 3


def load(name: str) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def text2img():
    return load(DEFAULT_TEXT2IMG)


@pytest.fixture
def superres():
    return load(DEFAULT_SUPERRES)


def draw(pipe, seed: int = 0, **kwargs):
    return pipe(["thumbs up"], num_inference_steps=STEPS, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def upscale(pipe, **kwargs):
    small = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return pipe(small, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt",
                **kwargs).images


def diffusers_text2img():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LDMTextToImagePipeline.from_pretrained(str(bundled_folder(DEFAULT_TEXT2IMG)),
                                                          torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


def diffusers_draw(ref, seed: int = 0):
    # diffusers makes latents of height // 8; this autoencoder is f=4, so 64 gives ldmkit's default 32x32 image.
    return ref(["thumbs up"], num_inference_steps=STEPS, guidance_scale=3.0, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="np").images


def as_np(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def watch(pipe, monkeypatch) -> list[tuple[str, str]]:
    """Log every ``component.to(...)`` and every run of a component (after the offload hooks, which were
    registered first), compressing repeated runs."""
    log: list[tuple[str, str]] = []
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            def to(*args, _name=name, _to=module.to, **kwargs):
                log.append(("to", _name))
                return _to(*args, **kwargs)

            monkeypatch.setattr(module, "to", to)
    runs = {"bert": pipe.bert, "unet": pipe.unet, "vqvae": pipe.vqvae.decoder}
    for name, module in runs.items():
        def ran(*_, _name=name):
            assert pipe._offload.resident == _name  # the whole component is on the offload device
            if log[-1] != ("run", _name):
                log.append(("run", _name))

        module.register_forward_pre_hook(ran)
    return log


# ----------------------------------------------------------------------------------------- model offload
def test_model_offload_moves_each_component_only_around_its_run(text2img, monkeypatch):
    expected = draw(text2img)
    text2img.enable_model_cpu_offload(device="cpu")
    log = watch(text2img, monkeypatch)
    for _ in range(2):
        log.clear()
        assert torch.equal(draw(text2img), expected)
        # On, run, off: the previous component leaves when the next one arrives; the call ends with none on.
        assert log == [("to", "bert"), ("run", "bert"), ("to", "bert"), ("to", "unet"), ("run", "unet"),
                       ("to", "unet"), ("to", "vqvae"), ("run", "vqvae"), ("to", "vqvae")]
        assert text2img._offload.resident is None and text2img._execution_device == torch.device("cpu")


def test_model_offload_matches_diffusers_offload(text2img):
    ref = diffusers_text2img()
    pytest.importorskip("accelerate")
    ref.enable_model_cpu_offload(device="cpu")
    text2img.enable_model_cpu_offload(device="cpu")
    assert np.abs(as_np(draw(text2img, seed=2)) - diffusers_draw(ref, seed=2)).max() <= 1e-4


def test_offload_covers_direct_calls_of_a_components_parts(superres):
    """The tiled super-resolution decode calls ``vqvae.quantize`` and ``vqvae.decode`` itself."""
    tiles = {"tiling": True, "tile_size": 16, "tile_overlap": 8, "decode_tile_size": 16}  # 2x2 tiles
    expected = upscale(superres, **tiles)
    for enable in (superres.enable_model_cpu_offload, superres.enable_sequential_cpu_offload):
        enable(device="cpu")
        assert torch.equal(upscale(superres, **tiles), expected)
    superres.remove_all_hooks()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in superres.unet.modules())


def test_offload_moves_every_tensor_of_the_outputs():
    """What crosses a component's border moves whole, in the same types (moved to "meta" here, the one other
    device every machine has)."""
    t = torch.ones(2)
    tree = {"a": [t, (t, 3)], "unet": UNet2DConditionOutput(sample=t), "bert": LDMBertOutput(t),
            "decoder": DecoderOutput(sample=t), "images": ImagePipelineOutput(images=t), "none": None}
    moved = _to_device(tree, torch.device("meta"))
    assert _find_device(((), tree)) == torch.device("cpu") and _find_device(((1, "x"), {})) is None
    assert type(moved["a"][1]) is tuple and moved["a"][1][1] == 3 and moved["none"] is None
    for key, first in (("unet", "sample"), ("bert", "last_hidden_state"), ("decoder", "sample"), ("images", "images")):
        assert type(moved[key]) is type(tree[key]) and getattr(moved[key], first).is_meta
    assert moved["decoder"].commit_loss is None and moved["images"]["images"].is_meta and moved["a"][0].is_meta


# ----------------------------------------------------------------------------------------- sequential offload
def test_sequential_offload_places_one_submodule_at_a_time(text2img):
    expected = draw(text2img)
    text2img.enable_sequential_cpu_offload(device="cpu")
    placed = text2img._offload.placed
    conv_in, conv_out = text2img.unet.conv_in, text2img.vqvae.decoder.conv_out
    seen = []

    def check(*_):
        seen.append(1)
        assert placed[id(conv_in.weight)][1] > 0  # the running layer's weights are placed
        assert placed.get(id(conv_out.weight), [None, 0])[1] == 0  # a layer that is not running: not placed

    conv_in.register_forward_pre_hook(check)
    assert torch.equal(draw(text2img), expected)
    assert seen and all(users == 0 and home is None for home, users in placed.values())
    # Every weight that ran was placed (the spatial transformer's projections too, read without a call).
    assert all(id(p) in placed for m in (text2img.unet, text2img.bert, text2img.vqvae.decoder) for p in m.parameters())


# ----------------------------------------------------------------------------------------- no accelerator
@no_cuda
def test_offload_without_an_accelerator_warns_and_runs(text2img):
    expected = draw(text2img)
    for enable in (text2img.enable_model_cpu_offload, text2img.enable_sequential_cpu_offload):
        with pytest.warns(UserWarning, match="no accelerator"):
            enable()
        assert text2img._offload is None
        assert torch.equal(draw(text2img), expected)
    ref = diffusers_text2img()
    with pytest.raises((RuntimeError, ImportError)):  # diffusers stops the script here
        ref.enable_model_cpu_offload()


def test_offload_device_errors(text2img):
    with pytest.raises(LDMKitError, match="both give a device index"):
        text2img.enable_model_cpu_offload(gpu_id=1, device="cpu:0")
    with pytest.raises(LDMKitError, match="gpu_id"):
        text2img.enable_sequential_cpu_offload(gpu_id=-1, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LDMKitError, match="no CUDA GPU"):
            text2img.enable_model_cpu_offload(device="cuda")
    assert text2img._offload is None


# ----------------------------------------------------------------------------------------- on a real GPU
@cuda
def test_cuda_model_offload_keeps_components_on_the_cpu_between_calls(text2img):
    torch.backends.cudnn.allow_tf32 = False
    expected = draw(text2img)
    text2img.enable_model_cpu_offload()
    during = {}

    def record(*_):
        during.update({name: {p.device.type for p in getattr(text2img, name).parameters()}
                       for name in ("bert", "unet", "vqvae")})

    text2img.unet.register_forward_pre_hook(record)
    for _ in range(2):
        out = draw(text2img)
        assert during == {"bert": {"cpu"}, "unet": {"cuda"}, "vqvae": {"cpu"}}
        assert all(p.device.type == "cpu" for m in text2img._modules() for p in m.parameters())
        assert torch.cuda.memory_allocated() < 2**20 and (out - expected).abs().max() <= 1e-3


@cuda
def test_cuda_sequential_offload_holds_one_submodule(text2img):
    torch.backends.cudnn.allow_tf32 = False
    expected = draw(text2img)
    text2img.enable_sequential_cpu_offload()
    unet = text2img.unet
    idle = unet.up_blocks[-1].resnets[-1].conv2  # does not run while conv_in does

    def record(*_):
        assert unet.conv_in.weight.device.type == "cuda" and idle.weight.device.type == "cpu"

    unet.conv_in.register_forward_pre_hook(record)
    torch.cuda.reset_peak_memory_stats()
    out = draw(text2img)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert torch.cuda.max_memory_allocated() < weights / 4
    assert all(p.device.type == "cpu" for m in text2img._modules() for p in m.parameters())
    assert (out - expected).abs().max() <= 1e-3


# ----------------------------------------------------------------------------------------- attention slicing
def test_attention_slicing_same_images_as_diffusers(text2img):
    expected = draw(text2img, seed=1)
    text2img.enable_attention_slicing()
    assert {type(p) for p in text2img.unet.attn_processors.values()} == {SlicedAttnProcessor}
    sliced = draw(text2img, seed=1)
    assert (sliced - expected).abs().max() <= 1e-5
    ref = diffusers_text2img()
    ref.enable_attention_slicing()
    assert np.abs(as_np(sliced) - diffusers_draw(ref, seed=1)).max() <= 1e-4
    text2img.disable_attention_slicing()
    assert {type(p) for p in text2img.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_attention_slicing_bounds_the_attention_memory(text2img):
    def largest():
        # SDPA's math kernel writes the scores out (its fused kernels never do): the case slicing is for.
        with sdpa_kernel(SDPBackend.MATH), PeakMemory() as probe:
            text2img(["thumbs up"], num_inference_steps=1, guidance_scale=3.0, height=128, width=128,
                     output_type="latent", generator=torch.Generator().manual_seed(0))
        return probe.largest

    # 128 px -> 32x32 latents: 1024 positions; guidance doubles the batch; 4 heads.
    score_matrix = 1024 * 1024 * 4
    assert largest() >= 2 * 4 * score_matrix
    text2img.enable_attention_slicing("max")
    assert largest() <= score_matrix


# ----------------------------------------------------------------------------------------- xformers
def test_xformers_switch_warns_and_keeps_the_images(text2img):
    expected = draw(text2img)
    text2img.unet.set_attention_slice("max")
    with pytest.warns(UserWarning, match="scaled_dot_product_attention") as record:
        text2img.enable_xformers_memory_efficient_attention()
    assert len(record) == 1
    assert {type(p) for p in text2img.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert (draw(text2img) - expected).abs().max() <= 1e-5
    text2img.disable_xformers_memory_efficient_attention()
    with pytest.raises(ModuleNotFoundError):  # diffusers without xformers installed stops the script
        diffusers_text2img().enable_xformers_memory_efficient_attention()


# ----------------------------------------------------------------------------------------- autoencoder tiling
def smooth_image(size: int) -> torch.Tensor:
    coarse = torch.rand(1, 3, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
    return F.interpolate(coarse, size=size, mode="bicubic").clamp(0, 1) * 2 - 1


def measure(fn):
    with torch.no_grad(), PeakMemory() as probe:
        out = fn()
    return out, probe.peak


def test_kl_tiling_close_to_untiled_with_less_memory_and_no_worse_than_diffusers(text2img):
    diffusers = pytest.importorskip("diffusers")
    vae = text2img.vqvae
    ref = diffusers.AutoencoderKL.from_pretrained(str(bundled_folder(DEFAULT_TEXT2IMG)), subfolder="vqvae").eval()
    image = smooth_image(256)
    latents, encode_peak = measure(lambda: vae.encode(image).latent_dist.mean)
    decoded, decode_peak = measure(lambda: vae.decode(latents).sample)
    vae.enable_tiling()
    vae.tile_sample_min_size = 128  # 32x32 latent tiles of the 64x64 latent, overlapping by 8
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 128, 32
    tiled_latents, tiled_encode_peak = measure(lambda: vae.encode(image).latent_dist.mean)
    tiled, tiled_decode_peak = measure(lambda: vae.decode(latents).sample)
    with torch.no_grad():
        their_tiled, their_latents = ref.decode(latents).sample, ref.encode(image).latent_dist.mean
    error = (tiled - decoded).abs().mean()
    assert error <= 0.04 and error <= (their_tiled - decoded).abs().mean()
    assert (tiled_latents - latents).abs().mean() <= 0.1 * latents.abs().mean()
    assert (tiled_latents - latents).abs().mean() <= 1.05 * (their_latents - latents).abs().mean()
    assert tiled_decode_peak < decode_peak / 3 and tiled_encode_peak < encode_peak / 2


def test_tiling_leaves_small_inputs_and_default_pipeline_images_alone(text2img):
    expected = draw(text2img)
    text2img.vqvae.enable_tiling()  # the default 32 px image is one tile: exactly as before
    assert torch.equal(draw(text2img), expected)


def test_vq_tiling_and_slicing(superres):
    diffusers = pytest.importorskip("diffusers")
    vq = superres.vqvae
    image = torch.cat([smooth_image(256), smooth_image(256).flip(-1)])
    latents = vq.encode(image).latents.detach()
    with torch.no_grad():
        decoded, decode_peak = measure(lambda: vq.decode(latents).sample)
        vq.enable_slicing()
        assert (vq.decode(latents).sample - decoded).abs().max() <= 1e-5
        assert (vq.encode(image).latents - latents).abs().max() <= 1e-5
        vq.disable_slicing()
        vq.enable_tiling()  # the default: 32x32 latent tiles (sample_size 128, f=4) of the 64x64 latent
        tiled, tiled_peak = measure(lambda: vq.decode(latents).sample)
        # Not equal: a tile's GroupNorms see the tile's statistics, not the image's (diffusers' tiles too).
        assert (tiled - decoded).abs().mean() <= 0.08 and tiled_peak < decode_peak / 2
        assert (vq.encode(image).latents - latents).abs().mean() <= 0.05 * latents.abs().mean()
    ref = diffusers.VQModel.from_pretrained(str(bundled_folder(DEFAULT_SUPERRES)), subfolder="vqvae")
    with pytest.raises(NotImplementedError):  # diffusers' VQModel has neither
        ref.enable_tiling()


def test_tile_sizes_are_checked(text2img):
    vae = text2img.vqvae
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == (32, 8, 0.25)
    vae.tile_sample_min_size = 64
    assert vae.tile_latent_min_size == 16
    vae.tile_latent_min_size = 12
    assert vae.tile_latent_min_size == 12
    with pytest.raises(LDMKitError, match="multiple of the downsampling factor 4"):
        vae.tile_sample_min_size = 30
    with pytest.raises(LDMKitError, match="positive int"):
        vae.tile_latent_min_size = 0
    vae.enable_tiling()
    vae.tile_overlap_factor = 1.0
    with pytest.raises(LDMKitError, match="tile_overlap_factor"):
        vae.decode(torch.zeros(1, 4, 32, 32))
