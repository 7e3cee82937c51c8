"""Training: autoencoders (KL / VQ, optional patch GAN) and latent diffusion models (text, concat, none),
from a YAML recipe, on one CPU or many GPUs (accelerate), resumable, exported in the diffusers layout.

accelerate and PyYAML are imported when a run starts and a recipe is read, not with this package, so the
``ldmkit`` command line can say which extra to install when they are missing.
"""

from .autoencoder import train_autoencoder
from .ldm import train_ldm
from .recipe import AutoencoderRecipe, LDMRecipe, build_recipe, load_recipe

__all__ = ["AutoencoderRecipe", "LDMRecipe", "build_recipe", "load_recipe", "train_autoencoder", "train_ldm"]
