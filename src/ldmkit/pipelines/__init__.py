"""Pipelines: one file per task, plus the base class."""

from .pipeline_latent_diffusion import LDMTextToImagePipeline
from .pipeline_latent_diffusion_superresolution import LDMSuperResolutionPipeline
from .pipeline_latent_diffusion_uncond import LDMPipeline
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput

# Pipelines that model_index.json's _class_name may name (DiffusionPipeline.from_pretrained dispatches here).
PIPELINE_NAMES = ["LDMTextToImagePipeline", "LDMSuperResolutionPipeline", "LDMPipeline"]

__all__ = [
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "LDMPipeline",
    "LDMSuperResolutionPipeline",
    "LDMTextToImagePipeline",
]
