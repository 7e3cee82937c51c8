"""Schedulers (samplers): diffusers' classes, config fields and results, with the maths in small functions."""

from .base import SchedulerMixin, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerMixin", "SchedulerOutput"]
