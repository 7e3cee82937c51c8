"""Schedulers (samplers) with diffusers' class names, config fields, defaults and results.

The maths lives in small pure functions next to each scheduler (cited to the papers); the classes keep the
state (timesteps, sigmas, multistep history). Any scheduler can be built from another's config:
``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``.
"""

from .base import SchedulerMixin, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "UniPCMultistepScheduler",
]
