"""dtype="auto": what ldmkit.hardware picks on machines played by mocked capabilities, and where it applies
(pipeline and model from_pretrained, pipe.to, the presets); the Python API's default stays float32."""

from __future__ import annotations

import pytest
import torch

from ldmkit import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, hardware
from ldmkit.models.modeling_utils import parse_dtype
from ldmkit.pipelines.presets import dtype_names, pick_dtype

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Play a machine: write its /proc/cpuinfo and point the reader at it."""
    def play(text: str | None):
        path = tmp_path / "cpuinfo"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(hardware, "CPUINFO", path)
    return play


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)


def test_cpu_flags_decide_bf16(cpuinfo, monkeypatch):
    monkeypatch.setattr(hardware, "_torch_probe", lambda name: pytest.fail("cpuinfo was readable"))
    cpuinfo(SAPPHIRE_RAPIDS)
    assert "amx_bf16" in hardware.cpu_flags() and hardware.auto_dtype("cpu") == torch.bfloat16
    cpuinfo(SKYLAKE)  # AVX-512 without its BF16 extension: bf16 would be emulated, slower than fp32
    assert hardware.cpu_flags() == {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni"}
    assert hardware.auto_dtype() == torch.float32
    cpuinfo("processor\t: 0\nflags\t\t: avx512_bf16\n")  # AVX-512 BF16 alone (Cooper Lake, Zen 4)
    assert hardware.auto_dtype(torch.device("cpu")) == torch.bfloat16


def test_without_cpuinfo_torch_probes_decide(cpuinfo, monkeypatch):
    cpuinfo(None)  # macOS, Windows
    assert hardware.cpu_flags() == frozenset()
    monkeypatch.setattr(hardware, "_torch_probe", lambda name: name == "_is_amx_tile_supported")
    assert hardware.auto_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(hardware, "_torch_probe", lambda name: False)
    assert hardware.auto_dtype("cpu") == torch.float32


def test_gpus_get_fp16_and_force_upcast_models_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.auto_dtype("cuda") == torch.float16
    assert hardware.auto_dtype("cuda:1", fp16_overflows=True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # Turing, Volta
    assert hardware.auto_dtype("cuda", fp16_overflows=True) == torch.float32
    assert hardware.auto_dtype("mps") == torch.float16
    assert hardware.auto_dtype("mps", fp16_overflows=True) == torch.float32
    assert hardware.auto_dtype("meta") == torch.float32


def test_force_upcast_is_read_from_the_config_with_the_class_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    # diffusers' AutoencoderKL defaults force_upcast to True: a config.json without it still overflows fp16.
    config = AutoencoderKL._with_defaults({"latent_channels": 4}, "force_upcast")
    assert parse_dtype("auto", "cuda", config) == torch.bfloat16
    assert parse_dtype("auto", "cuda", {"force_upcast": False}) == torch.float16
    assert parse_dtype("auto", "cuda", UNet2DConditionModel._with_defaults({}, "force_upcast")) == torch.float16


def test_pipeline_from_pretrained_auto(tiny_text2img_dir, bf16_cpu):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, torch_dtype="auto")
    assert {m.dtype for m in pipe._modules()} == {torch.bfloat16} and dtype_names(pipe) == "bf16"
    default = DiffusionPipeline.from_pretrained(tiny_text2img_dir)  # diffusers' contract: float32 unless asked
    assert {m.dtype for m in default._modules()} == {torch.float32}
    mixed = DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype={"unet": "auto", "default": torch.float32})
    assert mixed.unet.dtype == torch.bfloat16 and mixed.vqvae.dtype == torch.float32
    assert dtype_names(mixed) == {"unet": "bf16", "vqvae": "fp32", "bert": "fp32"}


def test_pipeline_from_pretrained_auto_on_a_cpu_without_bf16(tiny_text2img_dir, plain_cpu):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir, dtype="auto")
    assert {m.dtype for m in pipe._modules()} == {torch.float32}


def test_model_from_pretrained_auto(tiny_text2img_dir, monkeypatch):
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        unet = UNet2DConditionModel.from_pretrained(tiny_text2img_dir, subfolder="unet", torch_dtype="auto")
        assert unet.dtype == expected


def test_pipe_to_auto_follows_the_hardware(tiny_text2img_dir, monkeypatch):
    pipe = DiffusionPipeline.from_pretrained(tiny_text2img_dir)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert pipe.to(dtype="auto").dtype == torch.bfloat16
    assert pipe.to(torch.float32).dtype == torch.float32
    assert pipe.to("auto").dtype == torch.bfloat16  # a lone "auto" is the dtype, as a lone torch dtype
    pipe.to(torch.float32)
    assert pipe.to("cpu", "auto").dtype == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert pipe.to(dtype="auto").dtype == torch.float32


def test_presets_and_cli_names_use_the_same_detection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", cpu) == torch.bfloat16 and pick_dtype("fp32", cpu) == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("auto", cpu) == torch.float32 and pick_dtype("fp16", cpu) == torch.float16


def test_group_norm_statistics_are_float32_in_bf16():
    """What auto relies on instead of an fp32 GroupNorm of its own: torch computes the mean and variance of a
    bf16 input in float32 (a bf16 sum of 4096 values would be off by far more than one bf16 step)."""
    x = (torch.randn(2, 32, 64, 64, generator=torch.Generator().manual_seed(0)) + 10.0).bfloat16()
    norm = torch.nn.GroupNorm(8, 32).bfloat16()
    expected = torch.nn.functional.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(norm(x).float(), expected, atol=2e-2, rtol=1e-2)


def test_the_decoders_last_layers_run_in_float32_in_bf16():
    """The decoder's head (norm, activation, output conv) writes the pixels: in bf16 it runs in float32 and
    the image comes out in float32 (not rounded to bf16's 8 bits), nearer the float32 decode than with a bf16
    head."""
    from ldmkit.models.vae import Decoder

    torch.manual_seed(0)
    decoder = Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * 2,
                      block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        reference = decoder(z)
        decoder.bfloat16()
        image = decoder(z.bfloat16())
        body = decoder.conv_in(z.bfloat16())
        body = decoder.mid_block(body)
        for block in decoder.up_blocks:
            body = block(body)
        bf16_head = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(body))).float()
        float_head = decoder._head(body)  # the same body, the head in float32
    assert image.dtype == torch.float32 and torch.equal(image, float_head)
    assert not torch.equal(image, image.bfloat16().float())  # not rounded to bf16 at the end
    assert (image - reference).abs().mean() < (bf16_head - reference).abs().mean()
