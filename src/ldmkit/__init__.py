"""ldmkit: Latent Diffusion Models in plain PyTorch, with diffusers' API and files.

Importing the package imports the assembly (``ldmkit.assembly``), which registers the loaders behind
``DiffusionPipeline.from_pretrained`` / ``from_single_file`` / ``save_pretrained`` (see ``ldmkit.registry``):
any ``import ldmkit...`` runs this file first, so they are always there.
"""

__version__ = "0.1.0"

from . import startup  # noqa: F401, I001  (first: as the `ldmkit` command, Ctrl-C while torch imports is one line)
from . import assembly  # noqa: F401  (registers the pipelines' loaders)
from .configuration import ConfigMixin, FrozenDict
from .errors import LDMKitError
from .models import (
    AutoencoderKL,
    ClassEmbedder,
    LDMBertModel,
    ModelMixin,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from .pipelines import (
    DiffusionPipeline,
    ImagePipelineOutput,
    LDMClassConditionalPipeline,
    LDMInpaintPipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
)
from .schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from .tokenizer import LDMTokenizer

__all__ = [
    "AutoencoderKL",
    "ClassEmbedder",
    "ConfigMixin",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "DiffusionPipeline",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FrozenDict",
    "HeunDiscreteScheduler",
    "ImagePipelineOutput",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LDMBertModel",
    "LDMClassConditionalPipeline",
    "LDMInpaintPipeline",
    "LDMKitError",
    "LDMPipeline",
    "LDMSuperResolutionPipeline",
    "LDMTextToImagePipeline",
    "LDMTokenizer",
    "LMSDiscreteScheduler",
    "ModelMixin",
    "PNDMScheduler",
    "SchedulerMixin",
    "UNet2DConditionModel",
    "UNet2DModel",
    "UniPCMultistepScheduler",
    "VQModel",
    "__version__",
]
