"""ldmkit: Latent Diffusion Models in plain PyTorch, with diffusers' API and files."""

__version__ = "0.1.0"

from .configuration import ConfigMixin, FrozenDict
from .errors import LDMKitError
from .models import ModelMixin

__all__ = ["ConfigMixin", "FrozenDict", "LDMKitError", "ModelMixin", "__version__"]
