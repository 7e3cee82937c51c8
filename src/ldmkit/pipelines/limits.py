"""Size limits: a request whose latents and activations would not fit in memory is refused before anything
is allocated, with the estimate, the limit and the ways out (issue 15, case 14).

The estimate (bytes) of one chunk of ``n`` images, latents of ``C x h x w``, ``P`` UNet passes per step
(2 with classifier-free guidance), ``s`` the UNet's dtype size and ``s_d`` the decoder's::

    loop      = 8 * P * n * C * h * w * s                   x_t, the model output, the solvers' history
    unet      = n * P * s * ( sum_i (layers + 1) * c_i * t_i      skip connections held for the up path
                              + 8 * max_i c_i * t_i               one block's working set
                              + 2 * max_(attention levels i) heads_i * t_i^2     self-attention scores
                              + 2 * max_i heads_i * t_i * 77 )    cross-attention scores (conditional UNet)
    decode    = n * s_d * ( 8 * max_j c_j * T_j + 2 * t_0'^2 )    decoder blocks; mid-block attention
    output    = 2 * n * 3 * H * W * 4                             the float image, and its conversion
    total     = loop + max(unet, decode) + output

where level ``i`` of the UNet has ``c_i = block_out_channels[i]`` channels and ``t_i = ceil(h / 2^i) *
ceil(w / 2^i)`` tokens (of the UNet's tile for tiled super-resolution); ``heads_i`` is the number of
attention heads (diffusers' naming: ``num_attention_heads`` or ``attention_head_dim`` for a conditional
UNet, ``c_i / attention_head_dim`` for UNet2DModel); decoder level ``j`` works at ``T_j`` pixels of the
(tiled) decode, ``t_0'`` the latent tokens of its mid-block attention. The attention term is what SDPA's
math kernel materializes (fused kernels use less): the estimate errs on the side of refusing less than
it could, never of refusing what fits.

The limit is the memory available on the device the networks run on: ``MemAvailable`` of
``/proc/meminfo`` (or ``os.sysconf``) on the CPU, ``torch.cuda.mem_get_info`` plus PyTorch's cached free
blocks on CUDA. The environment variable ``LDMKIT_MAX_MEMORY`` replaces it (``64GiB``, ``500MB``, bytes;
``none`` turns the check off).
"""

from __future__ import annotations

import math
import os
import re

import torch

from ..errors import LDMKitError

ENV = "LDMKIT_MAX_MEMORY"
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
OFF = ("none", "off", "unlimited", "inf")
CONTEXT_TOKENS = 77


def parse_size(text: str) -> int | None:
    """``"64GiB"`` -> bytes; ``none`` / ``off`` -> None (no limit)."""
    value = text.strip().lower()
    if value in OFF:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in UNITS:
        raise LDMKitError(f"{ENV}={text!r} is not a size: write bytes or a number with a unit (500MB, 64GiB, 2TB), "
                          "or none to turn the memory check off.")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def format_size(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def read_meminfo(text: str) -> int | None:
    """``MemAvailable`` (bytes) from the text of ``/proc/meminfo``, None when it has none."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes, where the number comes from)``; ``(None, ...)`` when no limit applies or none is known."""
    override = os.environ.get(ENV)
    if override is not None and override.strip():
        return parse_size(override), f"{ENV}={override}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device}"
    if device.type != "cpu":
        return None, f"no memory figure for {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found = read_meminfo(f.read())
        if found is not None:
            return found, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None, "no memory figure for the CPU"


def _tokens(h: int, w: int, level: int) -> int:
    return math.ceil(h / 2**level) * math.ceil(w / 2**level)


def _heads(config, level: int, channels: int) -> int:
    """Attention heads of UNet level ``level`` as diffusers reads the config (see the module docstring)."""
    def pick(value):
        return value[level] if isinstance(value, list | tuple) else value

    if "cross_attention_dim" in config:  # UNet2DConditionModel: attention_head_dim is the number of heads
        return int(pick(config.get("num_attention_heads")) or pick(config.get("attention_head_dim")) or 8)
    head_dim = pick(config.get("attention_head_dim"))
    return max(1, channels // head_dim) if head_dim else 1


def unet_bytes(config, batch: int, h: int, w: int, size: int) -> int:
    """The UNet's peak activations for ``batch`` latents of ``h x w`` (the ``unet`` line of the docstring)."""
    channels = list(config.get("block_out_channels") or [320])
    layers = config.get("layers_per_block", 2)
    layers = max(layers) if isinstance(layers, list | tuple) else layers
    kinds = list(config.get("down_block_types") or [])
    maps = [c * _tokens(h, w, i) for i, c in enumerate(channels)]
    attention = [_heads(config, i, c) * _tokens(h, w, i) ** 2 for i, c in enumerate(channels)
                 if i < len(kinds) and "Attn" in kinds[i]]
    deepest = len(channels) - 1  # the mid-block attends at the deepest level
    attention.append(_heads(config, deepest, channels[deepest]) * _tokens(h, w, deepest) ** 2)
    # Cross-attention scores against the text (77 tokens as in LDMBert and CLIP): small but not nothing.
    cross = max(_heads(config, i, c) * _tokens(h, w, i) * CONTEXT_TOKENS for i, c in enumerate(channels)) \
        if "cross_attention_dim" in config else 0
    return batch * size * ((layers + 1) * sum(maps) + 8 * max(maps) + 2 * max(attention) + 2 * cross)


def decoder_bytes(config, batch: int, h: int, w: int, size: int) -> int:
    """The first stage's peak for decoding ``batch`` latents of ``h x w`` (the ``decode`` line)."""
    channels = list(config.get("block_out_channels") or [128])
    levels = len(channels)
    full_h, full_w = h * 2 ** (levels - 1), w * 2 ** (levels - 1)
    top = max(c * _tokens(full_h, full_w, i) for i, c in enumerate(channels))
    attention = 2 * (h * w) ** 2 if config.get("mid_block_add_attention", True) else 0
    return batch * size * (8 * top + attention)


def estimate(unet_config, vae_config, shape: tuple, passes: int, sizes: tuple[int, int],
             unet_size: tuple[int, int] | None = None, decode_size: tuple[int, int] | None = None) -> dict:
    """The parts of the estimate (bytes) for latents of ``shape`` = (n, C, h, w); ``sizes`` = the UNet's and
    the decoder's dtype sizes; ``unet_size`` / ``decode_size``: the latent tile each one works on, if tiled."""
    n, c, h, w = (int(v) for v in shape)
    unet_h, unet_w = unet_size or (h, w)
    dec_h, dec_w = decode_size or (h, w)
    factor = 2 ** (len((vae_config or {}).get("block_out_channels") or [0]) - 1)
    parts = {"latents": 8 * passes * n * c * h * w * sizes[0],
             "unet": unet_bytes(unet_config, n * passes, unet_h, unet_w, sizes[0]),
             "decode": decoder_bytes(vae_config, n, dec_h, dec_w, sizes[1]) if vae_config is not None else 0,
             "output": 2 * n * 3 * h * w * factor**2 * 4}
    parts["total"] = parts["latents"] + max(parts["unet"], parts["decode"]) + parts["output"]
    return parts


def check_fits(parts: dict, device: torch.device, hint: str = "") -> None:
    """Refuse (before anything is allocated) a request whose estimate exceeds the memory available."""
    limit, source = available_memory(device)
    if limit is None or parts["total"] <= limit:
        return
    detail = ", ".join(f"{k} {format_size(v)}" for k, v in parts.items() if k != "total" and v)
    raise LDMKitError(
        f"This request needs about {format_size(parts['total'])} of memory on {device} ({detail}), more than the "
        f"{format_size(limit)} available ({source}). Ask for fewer images at once (max_batch_size=...) or a "
        f"smaller height and width{hint}; if it does fit, raise the limit with the environment variable "
        f"{ENV} (e.g. {ENV}=64GiB, or {ENV}=none to turn the check off).")
