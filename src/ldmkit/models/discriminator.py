"""The patch discriminator of the autoencoder's adversarial loss (first stage of LDM, after VQGAN)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LDMKitError


class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix, sec. 3.2.2): a stack of strided 4x4 convolutions whose output is
    one real/fake logit per overlapping patch, as used by VQGAN (Esser et al. 2021, sec. 3.1) and the LDM
    autoencoders. ``norm`` is "batch" as the original, or "group" (statistics per sample, so the result does
    not depend on how the batch is split across processes).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise LDMKitError(f"NLayerDiscriminator: norm={norm!r} is not supported. Use 'batch' (the original "
                              "VQGAN discriminator) or 'group' (per-sample statistics, independent of how the batch "
                              "is split across processes); in a training recipe this is loss.disc_norm.")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c // 4) or 1, c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] -> patch logits ``(B, 1, h, w)``."""
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation (Radford et al. 2016), as pix2pix and VQGAN.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
