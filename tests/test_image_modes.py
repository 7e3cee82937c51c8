"""Issue 15 case 13: images that PIL's convert("RGB") would silently clip or truncate are read correctly,
and float / integer inputs outside the [0, 1] contract are refused with the fix."""

import numpy as np
import PIL.Image
import pytest
import torch

from ldmkit.errors import LDMKitError
from ldmkit.pipelines.image_processing import to_tensor


def test_16_bit_grey_is_read_over_its_whole_range():
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    image = PIL.Image.fromarray(values, mode="I;16")
    with pytest.warns(UserWarning, match="0-65535"):
        t = to_tensor(image)
    assert t.shape == (1, 3, 2, 2)
    assert torch.allclose(t[0, 0], torch.tensor(values / 65535.0, dtype=torch.float32), atol=1e-6)  # not white


def test_float_mode_in_unit_range_is_kept_not_truncated():
    values = np.array([[0.25, 0.5], [0.75, 1.0]], dtype=np.float32)
    t = to_tensor(PIL.Image.fromarray(values, mode="F"))
    assert torch.allclose(t[0, 1], torch.from_numpy(values))  # PIL's convert would give 0/1


def test_float_mode_with_255_range_is_scaled_with_a_warning():
    values = np.array([[0.0, 127.5], [255.0, 51.0]], dtype=np.float32)
    with pytest.warns(UserWarning, match="0-255"):
        t = to_tensor(PIL.Image.fromarray(values, mode="F"))
    assert torch.allclose(t[0, 2], torch.from_numpy(values / 255.0))


def test_float_tensor_in_0_255_is_refused_with_the_fix():
    with pytest.raises(LDMKitError, match="image / 255"):
        to_tensor(torch.full((3, 8, 8), 200.0))
    with pytest.raises(LDMKitError, match="image / 255"):
        to_tensor(np.full((8, 8, 3), 200.0, dtype=np.float32))


def test_int64_tensor_is_refused_naming_uint8():
    with pytest.raises(LDMKitError, match=r"image.to\(torch.uint8\)"):
        to_tensor(torch.full((3, 8, 8), 200, dtype=torch.int64))
