"""diffusers' module of LDMBert and the text-to-image pipeline
(``diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion``), re-exporting ldmkit's classes."""

from ...models.ldmbert import LDMBertModel, LDMBertOutput
from ..pipeline_latent_diffusion import LDMTextToImagePipeline

__all__ = ["LDMBertModel", "LDMBertOutput", "LDMTextToImagePipeline"]
