"""Convolutional building blocks: the time-conditioned residual block and 2x down/up-sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError

# Names used in diffusers configs (``act_fn``) -> activation module.
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise LDMKitError(f"Unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}.") from None


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (or a 2x2 average pool when ``use_conv`` is False).

    ``padding=0`` pads only right and bottom by one pixel first, as the LDM autoencoder does
    (Rombach et al. 2022), so that an even input gives exactly half the size.
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if out_channels != channels:
                raise LDMKitError("Downsample2D without a conv cannot change the channel count.")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution by nearest-neighbour interpolation, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.conv = None
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None
                ) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return hidden_states if self.conv is None else self.conv(hidden_states)


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with an additive (or scale-shift) timestep conditioning.

    ``norm1 -> act -> conv1 -> (+ time_emb_proj(act(temb))) -> norm2 -> act -> dropout -> conv2``, plus a
    1x1 ``conv_shortcut`` on the skip path when the channel count changes (DDPM, Ho et al. 2020, appendix B;
    the "scale_shift" variant is FiLM-style, ``norm2(h) * (1 + scale) + shift``).
    ``temb_channels=None`` drops the conditioning (the autoencoder's blocks). ``up``/``down`` resample both
    paths inside the block (the "resnet" up/down-sampling of UNet2DModel).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act_fn: str = "silu",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise LDMKitError(f"resnet_time_scale_shift={time_embedding_norm!r} is not supported; "
                              "use 'default' or 'scale_shift'.")
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = get_activation(act_fn)
        self.resample = None
        if up:
            self.resample = Upsample2D(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample2D(in_channels, use_conv=False)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.act(self.norm1(input_tensor))
        if self.resample is not None:
            input_tensor = self.resample(input_tensor)
            hidden_states = self.resample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None and temb is not None:
            temb = self.time_emb_proj(self.act(temb))[:, :, None, None]
            if self.scale_shift:
                scale, shift = temb.chunk(2, dim=1)
                hidden_states = torch.addcmul(shift, self.norm2(hidden_states), 1 + scale)
            else:
                hidden_states = self.norm2(hidden_states + temb)
        else:
            hidden_states = self.norm2(hidden_states)

        hidden_states = self.conv2(self.dropout(self.act(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        output = input_tensor + hidden_states
        # Skip the division when it is by 1 (the usual case): a whole extra pass over the activations.
        return output if self.output_scale_factor == 1.0 else output / self.output_scale_factor
