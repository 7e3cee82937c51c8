"""What the network predicts, turned into what a sampler integrates: the one conversion table of all schedulers.

Alpha space (variance preserving; DDPM, DDIM, PNDM, DPM-Solver, UniPC): ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)`` (Ho et al. 2020, eq. 4), and the velocity
``v = alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022, "Progressive Distillation", sec. 4). For rectified-flow
sigmas ``alpha_t = 1 - sigma_t`` and the network predicts ``v = eps - x_0`` (``flow_prediction``).

Sigma space (variance exploding; Euler, Heun, LMS): ``x = x_0 + sigma eps``, and the network saw the scaled input
``x / sqrt(sigma^2 + 1)`` (Karras et al. 2022, Table 1, VP column); the ``ve_x0`` column is the denoiser
``D(x; sigma)``.

EDM (Karras et al. 2022, Table 1, EDM column, eq. 7): networks trained with EDM's preconditioning see
``c_in x`` and ``c_noise`` and predict ``F`` with ``D(x; sigma) = c_skip x + c_out F``; ``sigma_data`` is the
data's standard deviation. See :func:`edm_denoised`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import LDMKitError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Conversion(NamedTuple):
    """One row: x_0 and eps in alpha space as functions of ``(model_output, sample, alpha_t, sigma_t)``, and
    x_0 in sigma space as a function of ``(model_output, sample, sigma)``; None where the prediction has none."""

    x0: Callable
    eps: Callable | None
    ve_x0: Callable | None


_SAMPLE = Conversion(x0=lambda m, x, a, s: m, eps=lambda m, x, a, s: (x - a * m) / s, ve_x0=lambda m, x, sigma: m)

CONVERSIONS: dict[str, Conversion] = {
    "epsilon": Conversion(
        x0=lambda m, x, a, s: (x - s * m) / a,
        eps=lambda m, x, a, s: m,
        ve_x0=lambda m, x, sigma: x - sigma * m,
    ),
    "v_prediction": Conversion(
        x0=lambda m, x, a, s: a * x - s * m,
        eps=lambda m, x, a, s: a * m + s * x,
        # x_0 = alpha_vp x_vp - sigma_vp v with x_vp = x / sqrt(sigma^2 + 1) = alpha_vp x, sigma_vp = sigma alpha_vp.
        ve_x0=lambda m, x, sigma: m * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1)),
    ),
    "sample": _SAMPLE,
    "original_sample": _SAMPLE,  # diffusers' older name for "sample" (Euler, Heun, LMS accept it)
    # Rectified flow: x = (1 - sigma) x_0 + sigma eps, so x_0 = x - sigma v (sigma_t is sigma there).
    "flow_prediction": Conversion(x0=lambda m, x, a, s: x - s * m, eps=None, ve_x0=None),
}


def bad_prediction_type(prediction_type, allowed=PREDICTION_TYPES) -> LDMKitError:
    return LDMKitError(f"Unknown prediction_type {prediction_type!r}; use one of {', '.join(allowed)} "
                       "(what the model was trained to predict; see the model's scheduler_config.json).")


def _column(prediction_type: str, column: str) -> Callable:
    row = CONVERSIONS.get(prediction_type)
    convert = getattr(row, column) if row is not None else None
    if convert is None:
        allowed = [name for name, r in CONVERSIONS.items() if getattr(r, column) is not None]
        raise bad_prediction_type(prediction_type, allowed)
    return convert


def alpha_sigma(alpha_bar):
    """``(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))``: the alpha-space pair of a training step."""
    return alpha_bar ** (0.5), (1 - alpha_bar) ** (0.5)


def to_x0(model_output, sample, alpha_t, sigma_t, prediction_type: str):
    """The x_0 estimate in alpha space."""
    return _column(prediction_type, "x0")(model_output, sample, alpha_t, sigma_t)


def to_eps(model_output, sample, alpha_t, sigma_t, prediction_type: str):
    """The eps estimate in alpha space."""
    return _column(prediction_type, "eps")(model_output, sample, alpha_t, sigma_t)


def to_x0_and_eps(model_output, sample, alpha_t, sigma_t, prediction_type: str):
    """Both estimates in alpha space (DDIM needs the pair)."""
    return (to_x0(model_output, sample, alpha_t, sigma_t, prediction_type),
            to_eps(model_output, sample, alpha_t, sigma_t, prediction_type))


def ve_denoised(model_output, sample, sigma, prediction_type: str):
    """The denoiser ``D(x; sigma)`` (the x_0 estimate) of a sigma-space sample ``x = x_0 + sigma eps``."""
    return _column(prediction_type, "ve_x0")(model_output, sample, sigma)


# ---------------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1, EDM column)
# ---------------------------------------------------------------------------------------------------------

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def edm_c_in(sigma, sigma_data: float):
    """The input scale ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``."""
    return 1 / ((sigma**2 + sigma_data**2) ** 0.5)


def edm_c_noise(sigma):
    """The network's noise input ``c_noise = ln(sigma) / 4`` (what EDM models take as the timestep)."""
    return 0.25 * torch.log(sigma)


def edm_denoised(model_output, sample, sigma, sigma_data: float, prediction_type: str):
    """``D(x; sigma) = c_skip x + c_out F`` with ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)`` and
    ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)`` (negated for ``v_prediction``, as diffusers does)."""
    if prediction_type not in EDM_PREDICTION_TYPES:
        raise bad_prediction_type(prediction_type, EDM_PREDICTION_TYPES)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    if prediction_type == "v_prediction":
        c_out = -c_out
    return c_skip * sample + c_out * model_output
