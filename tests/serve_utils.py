"""Helpers for tests/test_serve_*.py: a server on a free loopback port (uvicorn in a thread), PNG decoding,
and a tiny random-weight inpainting pipeline folder (no inpainting model is bundled)."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

from ldmkit import DDIMScheduler, LDMInpaintPipeline, UNet2DModel, VQModel
from ldmkit.serve.config import ServeConfig
from ldmkit.serve.server import make_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(page: bool = False, **settings):
    """Yield (base URL, the app's ServeState) of a server started here, stopped (drained) on exit."""
    config = ServeConfig(port=free_port(), **settings)
    server = make_server(config, page=page)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"server did not get ready: {httpx.get(base + '/ready').text}")
    try:
        yield base, server.config.app.state.serve
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def decode_png(data: bytes | str) -> Image.Image:
    if isinstance(data, str):
        data = base64.b64decode(data)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def pixels(data) -> np.ndarray:
    return np.asarray(decode_png(data).convert("RGB"), dtype=np.int16)


def build_inpaint_folder(folder) -> str:
    """A random-weight LDMInpaintPipeline (VQ first stage with factor 4, 7-channel UNet: 32x32 images)."""
    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 16, 32),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=1, norm_num_groups=8, num_vq_embeddings=64)
    unet = UNet2DModel(sample_size=8, in_channels=7, out_channels=3, block_out_channels=(16, 16, 32, 32),
                       layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8)
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0205, beta_schedule="scaled_linear", clip_sample=False)
    LDMInpaintPipeline(vqvae=vq, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return str(folder)


def assert_same_image(a, b) -> None:
    """The same image up to float rounding: batched matmuls round differently from unbatched ones, so a pixel
    may move by one level of 255 (rarely: most runs are bit-identical); anything more is a real difference."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max diff {diff.max()}, {(diff > 0).sum()} values differ"
