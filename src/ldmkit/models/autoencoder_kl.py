"""The KL-regularised autoencoder: the first stage of the text-to-image LDM (f=8, 4 latent channels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..outputs import BaseOutput
from .attention import AttentionMixin, rename_legacy_attention_keys
from .modeling_utils import ModelMixin
from .tiling import AutoencoderTilingMixin, per_sample
from .unet_2d_blocks import check_spatial_input
from .vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


class AutoencoderKL(ModelMixin, AttentionMixin, AutoencoderTilingMixin):
    """Image autoencoder with a diagonal-Gaussian posterior and a KL penalty (Rombach et al. 2022, sec. 3.1).

    ``encode(x).latent_dist`` is ``q(z|x)``; diffusion runs on ``z * scaling_factor`` (sec. 4.3.2, appendix
    D.1) and ``decode`` maps ``z`` back to pixels in [-1, 1]. Config fields and parameter names are those of
    diffusers' ``AutoencoderKL``. ``shift_factor``, ``latents_mean``, ``latents_std`` and ``force_upcast``
    are kept in the config for the pipelines; they do not change the network. ``enable_tiling`` /
    ``enable_slicing`` bound the memory of large images / batches (:class:`AutoencoderTilingMixin`).
    """

    _supports_gradient_checkpointing = True

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: list[str] = ("DownEncoderBlock2D",),
        up_block_types: list[str] = ("UpDecoderBlock2D",),
        block_out_channels: list[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        **inert_features,
    ):
        super().__init__()
        self.register_config(locals())
        shared = {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
                  "norm_num_groups": norm_num_groups, "act_fn": act_fn,
                  "mid_block_add_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, double_z=True, **shared)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, **shared)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.use_slicing = False

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights", **cast) -> None:
        super().load_weights(rename_legacy_attention_keys(state), source=source, **cast)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images ``(B, in_channels, H, W)`` in [-1, 1] -> posterior over ``(B, latent, H/f, W/f)``."""
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        check_spatial_input(type(self).__name__, x, self.config.in_channels, factor, "images")
        moments = per_sample(x, lambda part: self._encode_tiled(part, self._moments), self.use_slicing)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents ``(B, latent_channels, h, w)`` (unscaled: divide by ``scaling_factor`` first) -> images."""
        check_spatial_input(type(self).__name__, z, self.config.latent_channels, 1, "latents")
        images = per_sample(z, lambda part: self._decode_tiled(part, self._decode), self.use_slicing)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct ``sample``: decode the posterior's mode, or a draw from it if ``sample_posterior``."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        images = self.decode(z).sample
        return DecoderOutput(sample=images) if return_dict else (images,)
