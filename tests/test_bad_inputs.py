"""Bad inputs of issue 15 that must be a clear LDMKitError or a correct conversion: loading dtypes (case 3), text
files where weights belong (case 5), and image depths and ranges (case 13)."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit import DiffusionPipeline, LDMKitError
from ldmkit.loading.weights import load_state_dict
from ldmkit.pipelines.image_processing import to_tensor

RAMP = (np.arange(64, dtype=np.float64).reshape(8, 8) / 63)  # 0 .. 1


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn, {"unet": torch.int64}])
def test_a_dtype_no_model_can_load_in_is_refused(dtype):
    with pytest.raises(LDMKitError, match="cannot hold model weights"):
        DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img", torch_dtype=dtype)


@pytest.mark.parametrize("text, match", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git lfs pull"),
    (b"https://huggingface.co/x/y/resolve/main/model.ckpt\n", "saved link"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
    (b"just some notes\n", "a text file"),
])
@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors", "pytorch_model.bin"])
def test_text_where_weights_belong_says_what_it_is(tmp_path, text, match, name):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(LDMKitError, match=match):
        load_state_dict(path)


@pytest.mark.parametrize("image", [
    PIL.Image.fromarray((RAMP * 65535).astype(np.uint16)),          # I;16
    PIL.Image.fromarray((RAMP * 65535).astype(np.int32)),           # I, 16-bit values
    PIL.Image.fromarray((RAMP * 255).astype(np.int32)),             # I, 8-bit values
    PIL.Image.fromarray(RAMP.astype(np.float32)),                   # F in [0, 1]
    PIL.Image.fromarray((RAMP * 255).astype(np.float32)),           # F in [0, 255]
])
def test_high_bit_images_keep_their_range(image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = to_tensor(image)
    assert t.shape == (1, 3, 8, 8)
    assert np.allclose(t[0, 0].numpy(), RAMP, atol=1 / 255)  # not clipped white, not truncated to 0/1


def test_a_16_bit_image_warns_how_it_was_read():
    with pytest.warns(UserWarning, match="0-65535"):
        to_tensor(PIL.Image.fromarray((RAMP * 65535).astype(np.uint16)))


@pytest.mark.parametrize("image, signed, match", [
    (torch.rand(3, 8, 8) * 255, True, "image / 127.5 - 1"),
    (torch.rand(3, 8, 8) * 255, False, "image / 255"),
    (np.random.rand(8, 8, 3) * 255, False, "image / 255"),
    (torch.randint(0, 255, (3, 8, 8)), True, "image.to\\(torch.uint8\\)"),
    (torch.randint(0, 9999, (3, 8, 8)), False, "float tensor"),
    (np.zeros((8, 8, 3), np.uint16), False, "65535"),
    (PIL.Image.fromarray((RAMP * 1e6).astype(np.float32)), False, "no image range"),
])
def test_images_in_the_wrong_range_are_refused_with_the_fix(image, signed, match):
    with pytest.raises(LDMKitError, match=match):
        to_tensor(image, signed=signed)


def test_superres_of_a_0_255_float_tensor_is_refused():
    pipe = DiffusionPipeline.from_pretrained("ldmkit:emoji-superres-4x")
    with pytest.raises(LDMKitError, match="127.5"):
        pipe(torch.rand(1, 3, 16, 16) * 255, num_inference_steps=1)
