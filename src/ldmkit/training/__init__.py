"""Training: autoencoders (KL / VQ, optional patch GAN) and latent diffusion models (text, concat, none),
from a YAML recipe, on one CPU or many GPUs (accelerate), resumable, exported in the diffusers layout.

Importing this package is cheap; accelerate and PyYAML are imported when a run starts.
"""

from .recipe import AutoencoderRecipe, LDMRecipe, build_recipe, load_recipe


def train_autoencoder(recipe, resume=None):
    from .autoencoder import train_autoencoder as run

    return run(recipe, resume)


def train_ldm(recipe, resume=None):
    from .ldm import train_ldm as run

    return run(recipe, resume)


__all__ = ["AutoencoderRecipe", "LDMRecipe", "build_recipe", "load_recipe", "train_autoencoder", "train_ldm"]
