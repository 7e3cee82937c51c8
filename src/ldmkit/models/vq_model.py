"""The vector-quantised autoencoder: the first stage of the LDM super-resolution / unconditional models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..outputs import BaseOutput
from .attention import AttentionMixin, rename_legacy_attention_keys
from .modeling_utils import ModelMixin
from .tiling import AutoencoderTilingMixin, per_sample
from .unet_2d_blocks import check_spatial_input
from .vae import Decoder, DecoderOutput, Encoder, VectorQuantizer


@dataclass
class VQEncoderOutput(BaseOutput):
    latents: torch.Tensor


class VQModel(ModelMixin, AttentionMixin, AutoencoderTilingMixin):
    """VQ-regularised image autoencoder (VQGAN first stage; Rombach et al. 2022, sec. 3.1).

    ``encode`` returns the continuous latents before quantisation (the diffusion model works on them);
    ``decode`` quantises to the nearest codebook vectors first, unless ``force_not_quantize``. Config
    fields and parameter names are those of diffusers' ``VQModel``, with one deliberate difference: the
    default ``scaling_factor`` is 1.0, the latent scale every CompVis VQ model was trained with, so that
    published configs that state none (ldm-celebahq-256) decode correctly (diffusers' default 0.18215
    gives garbage there, its issue 6725). A config that states a factor is obeyed. ``enable_tiling`` /
    ``enable_slicing`` bound the memory of large images / batches (:class:`AutoencoderTilingMixin`; diffusers'
    VQModel raises NotImplementedError for both); the quantiser always sees the whole latent.
    """

    # diffusers' VQModel refuses gradient checkpointing; its encoder and decoder are ours, which support it.
    _supports_gradient_checkpointing = True
    _inert_config_keys = {"norm_type": "group", "lookup_from_codebook": False}

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: list[str] = ("DownEncoderBlock2D",),
        up_block_types: list[str] = ("UpDecoderBlock2D",),
        block_out_channels: list[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 1.0,
        mid_block_add_attention: bool = True,
        force_upcast: bool = False,
        **inert_features,
    ):
        super().__init__()
        self.register_config(locals())
        vq_embed_dim = vq_embed_dim or latent_channels
        shared = {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
                  "norm_num_groups": norm_num_groups, "act_fn": act_fn,
                  "mid_block_add_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, double_z=False, **shared)
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, legacy=True)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, **shared)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights", **cast) -> None:
        super().load_weights(rename_legacy_attention_keys(state), source=source, **cast)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple:
        """Images ``(B, in_channels, H, W)`` in [-1, 1] -> unquantised latents ``(B, vq_dim, H/f, W/f)``."""
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        check_spatial_input(type(self).__name__, x, self.config.in_channels, factor, "images")
        latents = per_sample(x, lambda part: self._encode_tiled(part, self._latents), self.use_slicing)
        return VQEncoderOutput(latents=latents) if return_dict else (latents,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True
               ) -> DecoderOutput | tuple:
        """Latents -> images; ``commit_loss`` is the quantiser's loss (zeros when not quantising)."""
        check_spatial_input(type(self).__name__, h, self.quantize.vq_embed_dim, 1, "latents")
        if force_not_quantize:
            quantized = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            quantized, commit_loss, _ = self.quantize(h)
        # Quantisation is per position: it runs once on the whole latent; tiles and slices decode its output.
        images = per_sample(quantized, lambda part: self._decode_tiled(part, self._decode), self.use_slicing)
        return DecoderOutput(sample=images, commit_loss=commit_loss) if return_dict else (images, commit_loss)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Reconstruct ``sample`` through the quantised bottleneck."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)
