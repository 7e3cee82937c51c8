"""--fast / --exact for the generating commands: the preset (ldmkit.pipelines.presets), the command's own
--steps / --scheduler / --dtype on top of it, and what a PNG records so that --from-png replays the pixels.

``--fast`` (the default) is the "fast" preset: the dtype the hardware runs fast, DPM-Solver++(2M) Karras at
the preset's step count, the feature cache and the guidance interval. ``--exact`` is the behaviour before
presets existed: float32, the model's own scheduler, the command's own step count, no cache, guidance at
every step.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..errors import LDMKitError
from ..pipelines.presets import (
    DTYPE_NAMES,
    PRESETS,
    SAMPLERS,
    Preset,
    dtype_names,
    get_preset,
)

DTYPE_CHOICES = ["auto", *DTYPE_NAMES]
# What a PNG records of the run's preset (beside steps and scheduler, which every command records): restored
# by --from-png as they are, so a replay does not depend on what the preset means in a later version.
PRESET_KEYS = {"preset": (str,), "dtype": (str, dict), "cache_interval": (int,), "cache_schedule": (str,),
               "guidance_interval": (list, type(None)), "upscale_dtype": (str, dict),
               "upscale_scheduler": (str, type(None))}


def add_preset_options(p: argparse.ArgumentParser) -> None:
    """--fast / --exact and the --dtype / --scheduler overrides (each None: the preset's)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="preset", action="store_const", const="fast",
                       help="the fast preset (default): auto dtype, DPM-Solver++ 2M Karras, "
                       f"{PRESETS['fast'].num_inference_steps} steps, feature cache, guidance interval")
    group.add_argument("--exact", dest="preset", action="store_const", const="exact",
                       help="float32 and the model's own scheduler, no cache (the reference behaviour)")
    p.set_defaults(preset="fast", replay=False)
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="weights dtype (default: the preset's; auto = bf16 on CPUs with native bf16, fp16 on "
                   "CUDA, else fp32)")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), help="sampler (default: the preset's; --exact: the "
                   "model's own)")


def run_preset(args, default_steps: int) -> Preset:
    """The preset this run uses: the chosen one with --dtype / --scheduler / --steps on top, or for --from-png
    the recorded settings as they are. Its step count is always set (``default_steps`` where neither the
    preset nor --steps gives one)."""
    if args.replay:
        interval = args.guidance_interval
        preset = Preset(args.preset, dtype=args.dtype, sampler=args.scheduler, num_inference_steps=args.steps,
                        cache_interval=args.cache_interval, cache_schedule=args.cache_schedule,
                        guidance_interval=None if interval is None else tuple(interval))
    else:
        given = {"dtype": args.dtype, "sampler": args.scheduler, "num_inference_steps": args.steps}
        preset = replace(get_preset(args.preset), **{k: v for k, v in given.items() if v is not None})
    if preset.num_inference_steps is None:
        preset = replace(preset, num_inference_steps=default_steps)
    return preset


def upscale_preset(args, preset: Preset) -> Preset:
    """The preset of txt2img's --upscale pass: the run's dtype and fast-path settings with the base preset's
    sampler (--scheduler is the text-to-image model's) and --upscale-steps (default: the preset's step count,
    50 for --exact); on a replay, what the PNG recorded."""
    if args.replay:
        return replace(preset, dtype=args.upscale_dtype, sampler=args.upscale_scheduler,
                       num_inference_steps=args.upscale_steps, guidance_interval=None)
    base = get_preset(args.preset)
    steps = args.upscale_steps or base.num_inference_steps or 50
    dtype = args.dtype or base.dtype
    return replace(preset, dtype=dtype, sampler=base.sampler, num_inference_steps=steps, guidance_interval=None)


def preset_metadata(pipe, preset: Preset, other_dtypes: dict | None = None) -> dict:
    """What a PNG records of the preset: its name, the dtypes the networks ran in (not "auto": another machine
    may pick another; ``other_dtypes``: those of networks the run freed, as ``dtype_names``), the sampler
    (None: the model's own), the steps and the fast-path settings."""
    interval = preset.guidance_interval
    return {"preset": preset.name, "dtype": dtype_names(pipe, other_dtypes), "scheduler": preset.sampler,
            "steps": preset.num_inference_steps, "cache_interval": preset.cache_interval,
            "cache_schedule": preset.cache_schedule, "guidance_interval": None if interval is None else list(interval)}


def restore_preset(args, meta: dict) -> None:
    """--from-png: the recorded preset settings (already type-checked); a PNG from before presets was made
    with today's --exact (float32, the recorded scheduler, no cache)."""
    exact = PRESETS["exact"]
    args.preset = meta.get("preset", "exact")
    get_preset(args.preset)  # an edited name is refused here
    args.dtype = _dtype(args.from_png, "dtype", meta.get("dtype", exact.dtype))
    args.cache_interval = meta.get("cache_interval", exact.cache_interval)
    args.cache_schedule = meta.get("cache_schedule", exact.cache_schedule)
    args.guidance_interval = meta.get("guidance_interval", exact.guidance_interval)
    if meta.get("upscale"):
        args.upscale_dtype = _dtype(args.from_png, "upscale_dtype", meta.get("upscale_dtype", exact.dtype))
        args.upscale_scheduler = meta.get("upscale_scheduler", exact.sampler)
    args.replay = True


def _dtype(png: str, key: str, value: str | dict) -> str | dict:
    names = value.values() if isinstance(value, dict) else [value]
    if any(n not in DTYPE_NAMES for n in names):
        raise LDMKitError(f"{png}: metadata {key}={value!r} is not one of {', '.join(DTYPE_NAMES)} (or a dict of "
                          "them per component); fix or drop it.")
    return value
