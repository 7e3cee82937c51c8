"""ldmkit.utils against diffusers.utils: load_image and make_image_grid."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from ldmkit import LDMKitError
from ldmkit.utils import load_image, make_image_grid


def _images(n, size=(8, 6)):
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("rows, cols, resize", [(2, 2, None), (1, 4, None), (2, 2, 5)])
def test_make_image_grid_matches_diffusers(rows, cols, resize):
    from diffusers.utils import make_image_grid as theirs

    images = _images(4)
    ours = make_image_grid(images, rows, cols, resize=resize)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs(images, rows, cols, resize=resize)))


def test_make_image_grid_partial_rows_and_errors():
    sheet = make_image_grid(_images(5), cols=4)
    assert sheet.size == (32, 12)
    assert np.asarray(sheet)[6:, 8:].min() == 255  # the empty cells are white
    with pytest.raises(LDMKitError, match="hold 4 images, not 5"):
        make_image_grid(_images(5), rows=2, cols=2)
    with pytest.raises(LDMKitError, match="non-empty list"):
        make_image_grid([])


def test_load_image_matches_diffusers_and_applies_exif(tmp_path):
    from diffusers.utils import load_image as theirs

    image = _images(1)[0]
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)
    ours = load_image(str(path))
    assert ours.mode == "RGB" and ours.size == (6, 8)  # turned upright
    assert np.array_equal(np.asarray(ours), np.asarray(theirs(str(path))))
    assert load_image(path, convert_method=lambda im: im.convert("L")).mode == "L"
    assert load_image(image).size == image.size


def test_load_image_errors(tmp_path, monkeypatch):
    with pytest.raises(LDMKitError, match="neither an existing file"):
        load_image(str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(LDMKitError, match="not a readable image"):
        load_image(str(tmp_path / "notes.png"))
    path = tmp_path / "cut.png"
    _images(1, (64, 64))[0].save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LDMKitError, match="not a readable image"):
        load_image(str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LDMKitError, match="HF_HUB_OFFLINE"):
        load_image("https://example.invalid/cat.png")
