"""The state dict of an original CompVis checkpoint: reading it, sorting its keys by component, and checking
what no component uses (the noise schedule, the EMA copy, known stray keys)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import LDMKitError
from .weights import load_state_dict

if TYPE_CHECKING:
    from .compvis_config import CompVisSpec

logger = logging.getLogger("ldmkit")

# The noise-schedule buffers every LatentDiffusion saves; alphas_cumprod is checked against the YAML.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})
# Keys that real checkpoints carry and the original code ignores (load_state_dict(strict=False)): the DDIM
# sampler's buffers, saved into bsr_sr and inpainting_big (CompVis/latent-diffusion issue 24).
KNOWN_STRAY_KEYS = frozenset({"ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"})


def read_checkpoint(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict of a ``.ckpt`` (its ``state_dict``), a ``.safetensors`` file or a bare state dict
    (a pickle holding the dict itself, or the dict in memory). Pickles are read with weights_only=True."""
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = dict(state["state_dict"])
    else:
        state = load_state_dict(checkpoint)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LDMKitError(f"The checkpoint's state dict holds non-tensor entries ({', '.join(map(str, bad[:5]))}); "
                          "it is not a CompVis model checkpoint.")
    return state


def compvis_alphas_cumprod(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """``DDPM.register_schedule`` for the "linear" schedule: sqrt-spaced betas in float64, then float32."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def ema_name(unet_key: str) -> str:
    """LitEma's buffer name for ``model.diffusion_model.<unet_key>``: the parameter name without its dots."""
    return "model_ema." + f"diffusion_model.{unet_key}".replace(".", "")


def split_checkpoint(state: dict[str, torch.Tensor], spec: CompVisSpec, use_ema: bool | None):
    """Sort the keys by component; validate what is used by nothing (schedule, EMA, strays); pick the weights.

    Returns the parts ``{"unet": ..., "first_stage": ..., "cond_stage": ...}`` (prefixes removed), the scale
    factor and whether the UNet weights are the EMA ones.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "first_stage": {}, "cond_stage": {}, "ema": {}}
    prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "first_stage",
                "cond_stage_model.": "cond_stage", "model_ema.": "ema"}
    ignored, unknown, scale_factor = [], [], spec.first_stage_config["scaling_factor"]
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            parts[prefixes[prefix]][key[len(prefix):] if prefix != "model_ema." else key] = value
        elif key in SCHEDULE_BUFFERS or key in KNOWN_STRAY_KEYS or (key == "logvar" and spec.learn_logvar):
            ignored.append(key)
        elif key == "scale_factor" and spec.scale_by_std:
            scale_factor = float(value)  # scale_by_std: measured on the first batch and saved as a buffer
        else:
            unknown.append(key)
    if unknown:
        raise LDMKitError(f"The checkpoint has {len(unknown)} key(s) that are not part of this latent diffusion "
                          f"model: {', '.join(sorted(unknown)[:8])}. Is config.yaml the checkpoint's own?")
    _check_schedule(state, spec)

    has_ema = bool(parts["ema"])
    if use_ema and not has_ema:
        raise LDMKitError("use_ema=True but the checkpoint has no EMA weights (model_ema.*). Load it with "
                          "use_ema=False or None (ldmkit convert: without --use-ema).")
    # None: as the original scripts, which sample inside model.ema_scope(): EMA weights when the YAML's
    # use_ema (default True) is on and the file has them.
    chosen = has_ema and (use_ema if use_ema is not None else spec.use_ema)
    if chosen:
        parts["unet"] = _ema_weights(parts["unet"], parts["ema"])
    elif has_ema:
        ignored.append(f"model_ema.* ({len(parts['ema'])} keys, not used)")
    elif use_ema is None and spec.use_ema:
        logger.info("The config enables EMA but the checkpoint has no model_ema.* weights: using the live ones.")
    if spec.family == "inpainting":
        _check_duplicate_first_stage(parts["cond_stage"], parts["first_stage"])
        ignored.append(f"cond_stage_model.* ({len(parts['cond_stage'])} keys, the first stage again)")
    elif spec.family in ("unconditional", "super-resolution"):  # no conditioning weights
        if parts["cond_stage"]:
            raise LDMKitError(f"The checkpoint has cond_stage_model.* keys ({next(iter(parts['cond_stage']))}) "
                              f"but the config's {spec.family} model has no conditioning weights.")
    if ignored:
        logger.debug("CompVis checkpoint: ignoring keys the original code does not use: %s", ", ".join(ignored))
    logger.debug("CompVis checkpoint: %s UNet weights, scale_factor %s", "EMA" if chosen else "live",
                 scale_factor)
    return parts, scale_factor, chosen


def _ema_weights(unet: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {ema_name(k): k for k in unet}
    extra = sorted(set(ema) - set(names) - {"model_ema.decay", "model_ema.num_updates"})
    missing = sorted(set(names) - set(ema))
    if extra or missing:
        problems = []
        if missing:
            problems.append("no EMA copy of " + ", ".join(f"model.diffusion_model.{names[k]}" for k in missing[:5])
                            + f" (expected {missing[0]})")
        if extra:
            problems.append(f"unknown EMA keys {', '.join(extra[:5])}")
        raise LDMKitError(f"The checkpoint's EMA weights do not match its UNet: {'; '.join(problems)}. Load with "
                          "use_ema=False to use the live weights.")
    return {key: ema[name] for name, key in names.items()}


def _check_schedule(state: dict[str, torch.Tensor], spec: CompVisSpec) -> None:
    saved = state.get("alphas_cumprod")
    if saved is None:
        return
    cfg = spec.scheduler_config
    expected = compvis_alphas_cumprod(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
    if saved.shape != expected.shape or not torch.allclose(saved.float(), expected, rtol=1e-5, atol=1e-7):
        raise LDMKitError(f"The checkpoint's noise schedule (alphas_cumprod) is not the one config.yaml gives "
                          f"(linear_start {cfg['beta_start']}, linear_end {cfg['beta_end']}, timesteps "
                          f"{cfg['num_train_timesteps']}). Use the config.yaml that came with the checkpoint.")


def _check_duplicate_first_stage(cond: dict, first: dict) -> None:
    # __is_first_stage__: one module under two names; a safetensors copy stores it twice.
    if set(cond) != set(first) or any(not torch.equal(cond[k], first[k]) for k in cond):
        diff = sorted(set(cond) ^ set(first)) or [k for k in cond if not torch.equal(cond[k], first[k])]
        raise LDMKitError("The config's cond stage is the first stage (__is_first_stage__), but the checkpoint's "
                          f"cond_stage_model.* differs from first_stage_model.* (e.g. {diff[0]}).")
