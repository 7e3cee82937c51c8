"""The pieces of the one denoising loop that every pipeline runs (``DiffusionPipeline.denoise``).

The reverse process of Rombach et al. 2022, eq. (1)-(2) in latent space: from ``z_T ~ N(0, I)`` a scheduler
takes ``z_t -> z_{t-1}`` with the model's output ``eps_theta(z_t, t, c)`` (or ``x_0`` / ``v``), until ``z_0`` is
decoded by the first stage, ``x = D(z_0)``. A pipeline only says how the model is called at one step
(``predict(latents, t) -> model_output``, guidance included); this module has what is the same for all of
them: the sampling arguments, classifier-free guidance, the scheduler step and the first-stage decode.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LDMKitError
from ..randomness import randn_tensor
from .checks import check_generator, check_non_negative, check_positive_int

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CALLBACK_TENSORS = ("latents", "noise_pred")


@dataclass
class Sampling:
    """What a call asks of the loop: steps, DDIM's ``eta``, the generator(s) and the per-step callback.

    ``callback(pipe, step_index, timestep, tensors) -> dict | None`` gets the tensors named in
    ``callback_inputs`` after each step; a dict it returns replaces them (only ``latents`` is fed back).
    """

    num_inference_steps: int
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    callback: Callable | None = None
    callback_inputs: tuple[str, ...] = ("latents",)
    legacy_callback: Callable | None = None  # diffusers' deprecated callback=, made by legacy_callback()

    def check(self, batch_size: int, allowed_inputs: tuple[str, ...] = ("latents",)) -> None:
        check_positive_int("num_inference_steps", self.num_inference_steps)
        check_non_negative("eta", self.eta, "0 is deterministic DDIM, 1 is DDPM-like")
        if self.eta > 1:
            # The maths allows it (more noise than DDPM's posterior variance), but it is rarely meant.
            warnings.warn(f"eta={self.eta} is above 1: DDIM then adds more noise than DDPM (eta = 1) does.",
                          UserWarning, stacklevel=3)
        check_generator(self.generator)
        if isinstance(self.generator, list | tuple) and len(self.generator) != batch_size:
            raise LDMKitError(f"Got {len(self.generator)} generators for {batch_size} images: pass one generator, "
                              f"or a list of exactly {batch_size} (one per image).")
        if self.callback is not None and not callable(self.callback):
            raise LDMKitError(f"callback_on_step_end must be callable, got {type(self.callback).__name__}.")
        bad = sorted(set(self.callback_inputs) - set(allowed_inputs))
        if bad:
            raise LDMKitError(f"callback_on_step_end_tensor_inputs may name {', '.join(allowed_inputs)}; got {bad}.")


    def for_rows(self, rows: range) -> Sampling:
        """The sampling of one chunk of the call's images: a list of generators is cut to the chunk's rows."""
        if isinstance(self.generator, list | tuple):
            return dataclasses.replace(self, generator=list(self.generator[rows.start:rows.stop]))
        return self


def legacy_callback(call: Callable, extra: dict) -> Callable | None:
    """diffusers' deprecated ``callback(step, timestep, latents)`` every ``callback_steps`` steps, as a hook
    of the loop (diffusers' LDM pipelines accept and ignore it; here it works, with diffusers' deprecation
    warning). Any other unexpected keyword is an error naming the nearest argument of ``call``."""
    unknown = sorted(set(extra) - {"callback", "callback_steps"})
    if unknown:
        names = [n for n in inspect.signature(call).parameters if n not in ("self", "kwargs")]
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else f" The arguments are: {', '.join(names)}."
        raise LDMKitError(f"Unexpected argument(s) {unknown}.{hint}")
    if not extra:
        return None
    warnings.warn("callback and callback_steps are deprecated (as in diffusers): use callback_on_step_end("
                  "pipe, step, timestep, tensors).", FutureWarning, stacklevel=3)
    callback, every = extra.get("callback"), extra.get("callback_steps", 1)
    check_positive_int("callback_steps", every)
    if callback is None:
        return None
    if not callable(callback):
        raise LDMKitError(f"callback must be callable, got {type(callback).__name__}.")

    def hook(pipe, i: int, t, tensors: dict) -> None:
        if i % every == 0:
            callback(i, t, tensors["latents"])

    return hook


class Guidance:
    """Classifier-free guidance (Ho & Salimans 2021; Rombach et al. 2022, sec. 4.3):
    ``e = e_u + s (e_c - e_u)`` for every ``s >= 0``. ``s == 1`` needs only the conditional pass and ``s == 0``
    only the unconditional one; otherwise both run as one batch, the unconditional half first (as the
    original samplers and diffusers).

    ``interval=(lo, hi)`` limits guidance to the steps whose noise level ``sigma_t = sqrt((1 - a_t) / a_t)``
    (``a_t`` = the scheduler's ``alphas_cumprod``) lies in ``lo < sigma_t <= hi`` (Kynkaenniemi et al.,
    "Applying guidance in a limited interval improves sample and distribution quality", 2024); on the other
    steps only the conditional pass runs (half the UNet batch). ``None`` (the default) guides every step.
    """

    def __init__(self, scale: float, interval: tuple[float, float] | None = None):
        self.scale = check_non_negative("guidance_scale", scale, "1 = no guidance")
        self.need_cond, self.need_uncond = scale != 0, scale != 1
        self.interval = check_interval(interval)
        self.cond_only = False  # this step runs the conditional half only (outside the interval)

    @property
    def both(self) -> bool:
        return self.need_cond and self.need_uncond

    def context(self, uncond: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor:
        """The conditioning batch matching :meth:`wrap`'s model input: ``[uncond, cond]``, or the one needed."""
        parts = [c for c, needed in ((uncond, self.need_uncond), (cond, self.need_cond)) if needed]
        return torch.cat(parts) if len(parts) == 2 else parts[0]

    def select(self, context: torch.Tensor) -> torch.Tensor:
        """The part of :meth:`context`'s batch the model is called with at this step."""
        return context.chunk(2)[1] if self.cond_only else context

    def wrap(self, model: Predict, scheduler=None) -> Predict:
        """``predict(latents, t)`` from ``model(batched latents, t)``, which sees the latents twice when both
        passes are needed (inside the guidance interval, which needs ``scheduler`` for the noise levels)."""
        if not self.both:
            return model
        if self.interval is not None and scheduler is None:
            raise LDMKitError("guidance_interval needs the scheduler's noise levels: pass wrap(model, scheduler).")

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.cond_only = self.interval is not None and not _inside(self.interval, scheduler, t)
            if self.cond_only:
                return model(latents, t)
            uncond, cond = model(torch.cat([latents, latents]), t).chunk(2)
            return uncond + self.scale * (cond - uncond)

        return predict


def check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise LDMKitError(f"guidance_interval must be a pair (lo, hi) of noise levels sigma, got {interval!r}; "
                          "e.g. (0.3, 5.0), or None to guide every step.") from None
    if not 0 <= lo < hi:
        raise LDMKitError(f"guidance_interval=({lo}, {hi}) needs 0 <= lo < hi (noise levels sigma = "
                          "sqrt((1 - alphas_cumprod) / alphas_cumprod)); use float('inf') for no upper bound.")
    return lo, hi


def _inside(interval: tuple[float, float], scheduler, t) -> bool:
    alphas = scheduler.alphas_cumprod
    index = min(max(int(round(float(t))), 0), len(alphas) - 1)
    sigma = ((1 - alphas[index]) / alphas[index]).sqrt().item()
    return interval[0] < sigma <= interval[1]


def make_step(scheduler, eta: float, generator, draw_noise_every_step: bool) -> Step:
    """``step(model_output, t, latents) -> z_{t-1}`` for this scheduler, worked out once per call.

    The generator always goes to ``scheduler.step`` when it takes one, so ``eta > 0`` reproduces from a seed
    (diffusers' LDM pipelines never pass it and draw from the global RNG). ``eta`` goes to the schedulers
    that have it (DDIM). With ``draw_noise_every_step`` (pipelines from original CompVis checkpoints) the loop
    also reproduces the original samplers' noise stream: their DDIM and PLMS steps draw ``torch.randn`` at
    every step, also where it is multiplied by 0 (eta = 0, PLMS), so that draw is made here from the
    generator. DDIM receives it as ``variance_noise`` (the draw it would make itself at eta > 0); schedulers
    that draw no noise (PNDM) drop it; schedulers that draw their own noise are left alone.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    compvis_noise = draw_noise_every_step and ("variance_noise" in params or "generator" not in params)
    takes_noise = "variance_noise" in params
    if compvis_noise and takes_noise:
        kwargs.pop("generator", None)

    def step(model_output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        extra = kwargs
        if compvis_noise:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            extra = {**kwargs, "variance_noise": noise} if takes_noise else kwargs
        return scheduler.step(model_output, t, latents, **extra).prev_sample

    return step


def decode_first_stage(vae, latents: torch.Tensor, scale: float, decode: Callable | None = None) -> torch.Tensor:
    """``x = D(z / scale)`` mapped from [-1, 1] to [0, 1] and clamped, for every first-stage model.

    ``z * (1 / scale)`` is a multiplication, as in the CompVis code and diffusers' text-to-image pipeline
    (a division differs in the last bit). ``decode(z)`` defaults to ``vae.decode(z).sample`` (a VQ decoder
    quantizes first); the tiled super-resolution decode passes its own. A half-precision decoder can
    overflow into inf/NaN (a black image): then the decode is recomputed in float32, with a warning.
    """
    decode = decode or (lambda z: vae.decode(z).sample)
    image = decode(latents.to(vae.dtype) * (1.0 / scale))
    if vae.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(image).all():
        warnings.warn(f"The {vae.dtype} first-stage decoder overflowed (inf/NaN pixels); decoding again in "
                      "float32. Keep the decoder in float32 to skip the second decode.", RuntimeWarning,
                      stacklevel=3)
        original = vae.dtype
        vae.to(torch.float32)
        try:
            image = decode(latents.float() * (1.0 / scale))
        finally:
            vae.to(original)
    # (x + 1) / 2 equals x / 2 + 0.5 bit for bit: halving is exact, so both round once.
    return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)
