"""Pipelines: one file per task, plus the base class."""

from .pipeline_latent_diffusion import LDMTextToImagePipeline
from .pipeline_latent_diffusion_class_conditional import LDMClassConditionalPipeline
from .pipeline_latent_diffusion_inpaint import LDMInpaintPipeline
from .pipeline_latent_diffusion_superresolution import LDMSuperResolutionPipeline
from .pipeline_latent_diffusion_uncond import LDMPipeline
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput

__all__ = [
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "LDMClassConditionalPipeline",
    "LDMInpaintPipeline",
    "LDMPipeline",
    "LDMSuperResolutionPipeline",
    "LDMTextToImagePipeline",
]
