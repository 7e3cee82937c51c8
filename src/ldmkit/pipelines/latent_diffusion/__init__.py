"""diffusers' import path of the LDM classes: ``diffusers.pipelines.latent_diffusion`` exports LDMBert and the
text-to-image and super-resolution pipelines, so a script that imports them from there changes only
``diffusers`` to ``ldmkit``. The classes are ldmkit's own (``ldmkit.models``, ``ldmkit.pipelines``)."""

from ...models.ldmbert import LDMBertModel
from ..pipeline_latent_diffusion import LDMTextToImagePipeline
from ..pipeline_latent_diffusion_superresolution import LDMSuperResolutionPipeline

__all__ = ["LDMBertModel", "LDMSuperResolutionPipeline", "LDMTextToImagePipeline"]
