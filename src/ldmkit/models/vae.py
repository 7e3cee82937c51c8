"""The first-stage autoencoder's parts: encoder, decoder, Gaussian posterior and vector quantiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..outputs import BaseOutput
from ..randomness import randn_tensor
from .conv import Conv2d
from .embeddings import lookup_table
from .unet_2d_blocks import UNetMidBlock2D, build_down_blocks, build_up_blocks


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


class Encoder(nn.Module):
    """Image -> latent moments: ``conv_in``, downsampling levels, a mid block with attention, ``conv_out``.

    The convolutional encoder of the LDM first stage (Rombach et al. 2022, sec. 3.1 and appendix G).
    ``double_z`` doubles the output channels (mean and log-variance of the KL autoencoder's posterior).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: list[str] = ("DownEncoderBlock2D",), block_out_channels: list[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu",
                 double_z: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        # padding 0 + a one-pixel right/bottom pad: the original LDM encoder's downsampling.
        self.down_blocks = build_down_blocks(down_block_types, block_out_channels, num_layers=layers_per_block,
                                             downsample_padding=0, resnet_eps=1e-6, resnet_act_fn=act_fn,
                                             resnet_groups=norm_num_groups, temb_channels=None)
        self.mid_block = _autoencoder_mid_block(block_out_channels[-1], norm_num_groups, act_fn,
                                                mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels,
                                  kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latent -> image: ``conv_in``, a mid block with attention, upsampling levels, ``conv_out``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 up_block_types: list[str] = ("UpDecoderBlock2D",), block_out_channels: list[int] = (64,),
                 layers_per_block: int = 2, norm_num_groups: int = 32, act_fn: str = "silu",
                 mid_block_add_attention: bool = True):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], kernel_size=3, padding=1)
        self.mid_block = _autoencoder_mid_block(block_out_channels[-1], norm_num_groups, act_fn,
                                                mid_block_add_attention)
        self.up_blocks = build_up_blocks(up_block_types, block_out_channels, skip_connections=False,
                                         num_layers=layers_per_block + 1, resnet_eps=1e-6, resnet_act_fn=act_fn,
                                         resnet_groups=norm_num_groups, temb_channels=None)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self._head(sample)

    def _head(self, sample: torch.Tensor) -> torch.Tensor:
        """The last norm, activation and convolution, which write the pixels. In half precision they run in
        float32 (and the image comes out in float32): bf16 keeps 8 significant bits, so a bf16 output would
        round every pixel by up to half an 8-bit level near +-1 on top of the body's own error. It is one
        narrow layer at the output resolution: a few percent of the decode."""
        if sample.dtype == torch.float32:
            return self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        norm, conv = self.conv_norm_out, self.conv_out
        sample = nn.functional.group_norm(sample.float(), norm.num_groups, norm.weight.float(), norm.bias.float(),
                                          norm.eps)
        return nn.functional.conv2d(self.conv_act(sample), conv.weight.float(), conv.bias.float(),
                                    padding=conv.padding)


def _autoencoder_mid_block(channels: int, groups: int, act_fn: str, add_attention: bool) -> UNetMidBlock2D:
    # One attention head over all channels; eps 1e-6 as the original autoencoder's GroupNorms.
    return UNetMidBlock2D(channels, temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
                          resnet_groups=groups, add_attention=add_attention, attention_head_dim=channels)


class DiagonalGaussianDistribution:
    """The KL autoencoder's posterior ``q(z|x) = N(mean, diag(exp(logvar)))`` (Kingma & Welling 2014).

    ``parameters`` holds mean and log-variance stacked on the channel axis. The log-variance is clamped
    to [-30, 20] as in the original LDM code (Rombach et al. 2022) so ``exp`` neither under- nor overflows.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """A reparameterised draw ``mean + std * eps`` (same noise as diffusers for the same generator)."""
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """``KL(self || other)`` per sample, summed over (C, H, W); ``other`` defaults to ``N(0, I)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under the distribution, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation, straight-through gradient (van den Oord et al. 2017, VQ-VAE).

    ``loss = ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2``: the "legacy" weighting of the taming-transformers
    code used to train the LDM VQ autoencoders, where ``beta`` multiplies the codebook term rather than
    the commitment term (kept for identical losses). The codebook is ``embedding.weight``.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = lookup_table(n_e, vq_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z (B, C, H, W) -> (z_q (B, C, H, W), loss (scalar), indices (B, H, W))``."""
        batch, channels, height, width = z.shape
        z = z.permute(0, 2, 3, 1)
        flat = z.reshape(-1, channels)
        indices = self.nearest_codes(flat)
        z_q = self.embedding(indices).view(z.shape)
        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        commitment_term = torch.mean((z_q.detach() - z) ** 2)
        if self.legacy:
            loss = commitment_term + self.beta * codebook_term
        else:
            loss = self.beta * commitment_term + codebook_term
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices.view(batch, height, width)

    # Positions per distance block: the full (positions x codes) matrix of a 512x512 latent and 8192 codes
    # would take 8.6 GB; blocks of 4096 rows take 128 MB and give the same argmin row by row.
    distance_block = 4096

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of ``flat`` (N, C)."""
        # torch.cdist as diffusers does, so that near-ties resolve to the same code.
        return torch.cat([torch.argmin(torch.cdist(rows, self.embedding.weight), dim=1)
                          for rows in flat.split(self.distance_block)])

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Codebook vectors for ``indices``, as a ``(B, C, H, W)`` tensor; ``shape`` is ``(B, H, W, C)``."""
        return self.embedding(indices.reshape(-1)).view(shape).permute(0, 3, 1, 2).contiguous()
