"""What this machine runs fast: the one place ``dtype="auto"`` is decided (``from_pretrained``, ``pipe.to``,
the CLI's ``--dtype auto``, the server and the presets all ask :func:`auto_dtype`).

The choice, per device:

- CPU: bfloat16 where the CPU has native bfloat16 arithmetic (x86 AVX-512 BF16 or AMX: oneDNN then runs the
  convolutions and matmuls in bf16, about 3x fp32 per UNet step on such a Xeon), float32 otherwise (bf16
  emulated on AVX2 is slower than fp32; float16 has no fast CPU kernels at all). ARM CPUs are not detected
  (no measurement of torch's bf16 kernels there): they get float32.
- CUDA: float16 (tensor cores on every GPU since Volta); a model whose config says it overflows in float16
  (diffusers' ``force_upcast=True``, set on autoencoders whose activations exceed float16's 65504) gets
  bfloat16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later: the same range as float32), float32
  where not (what diffusers' ``force_upcast`` itself does).
- MPS: float16 (bfloat16 needs macOS 14), float32 for a ``force_upcast`` model.
- anything else: float32.

The capability probes are plain functions (:func:`cpu_flags`, :func:`cpu_has_native_bf16`) so that tests
replace them to play other machines.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags of native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4) and AMX.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux lists in /proc/cpuinfo (its first ``flags`` line); empty where there is none
    (macOS, Windows)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def _torch_probe(name: str) -> bool:
    # torch.cpu's own cpuinfo probes (private in torch 2.x, hence the getattr): they also work off Linux.
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo, else from
    torch's own probes (for systems without /proc/cpuinfo)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & NATIVE_BF16_FLAGS)
    return _torch_probe("_is_avx512_bf16_supported") or _torch_probe("_is_amx_tile_supported")


def auto_dtype(device: torch.device | str | None = None, fp16_overflows: bool = False) -> torch.dtype:
    """The dtype ``"auto"`` means on ``device`` (None: the CPU), as the module docstring says;
    ``fp16_overflows``: the model is known to overflow float16 (its config's ``force_upcast``)."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if kind == "cuda":
        if not fp16_overflows:
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "mps":
        return torch.float32 if fp16_overflows else torch.float16
    return torch.float32


def overflows_fp16(config) -> bool:
    """A model config's own word that the network overflows in float16 (diffusers' ``force_upcast``)."""
    return bool(config.get("force_upcast", False)) if config is not None else False


# The narrowest first-level width of a conv network for which channels-last paid in bf16 on this project's
# Xeon (AMX), one core: 320 (the full-size text-to-image UNet step, 0.84 s against 1.0 s), 160 (the
# super-resolution UNet on 128-192 px tiles, 1.3-1.6x), 128 (the VQ f4 decoder on 64 px latent tiles, 2.1x);
# 64-96 (the emoji UNets) ran 10 % slower, and fp32 4-7 % slower on every one of them.
CHANNELS_LAST_MIN_WIDTH = 128


def prefers_channels_last(config, dtype: torch.dtype | None, device: torch.device | str | None) -> bool:
    """Whether a conv network of ``config`` (its ``block_out_channels``) runs faster in channels-last memory
    order in ``dtype`` on ``device`` (None: the CPU): bf16 on a CPU, wide enough (measured; see above)."""
    widths = (config or {}).get("block_out_channels") or ()
    device = torch.device(device if device is not None else "cpu")
    return (dtype == torch.bfloat16 and device.type == "cpu" and bool(widths)
            and int(widths[0]) >= CHANNELS_LAST_MIN_WIDTH)

