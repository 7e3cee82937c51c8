"""Convolutional building blocks: the time-conditioned residual block and 2x down/up-sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError
from .conv import Conv2d

# Names used in diffusers configs (``act_fn``) -> activation module.
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    """A new activation module for a diffusers ``act_fn`` name."""
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
                raise LDMKitError(f"Downsample2D without a conv (average pooling) cannot change the channel count "
                                  f"({channels} -> {out_channels}); pass use_conv=True or leave out_channels unset.")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution by nearest-neighbour interpolation, then (optionally) a 3x3 conv.

    For large inputs the pair is computed on the low-resolution grid instead (see
    :func:`upsample_conv_by_phases`): the same map with 16 instead of 36 multiply-adds per input pixel.
    """

    # Below this many low-resolution pixels (batch * H * W) folding the kernel costs more than it saves.
    PHASE_SPLIT_MIN_PIXELS = 1024

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.conv = None
        if use_conv:
            self.conv = Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None
                ) -> torch.Tensor:
        if output_size is None and self.conv is not None and (
                hidden_states.shape[0] * hidden_states.shape[2] * hidden_states.shape[3]
                >= self.PHASE_SPLIT_MIN_PIXELS):
            return upsample_conv_by_phases(hidden_states, self.conv.weight, self.conv.bias)
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return hidden_states if self.conv is None else self.conv(hidden_states)


# _FOLD[a, p, y] = 1 where tap p of output phase a (even / odd row) collects kernel row y. Output row 2i
# reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: taps (w0, w1 + w2) on inputs (i-1, i);
# output row 2i+1 reads input rows i, i, i+1: taps (w0 + w1, w2) on inputs (i, i+1). Columns alike.
_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsample_conv_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1) computed without materialising the upsampled input.

    Each output phase ``(2i + a, 2j + c)`` is a 2x2 convolution of the zero-padded input with folded
    weights (16 instead of 36 multiply-adds per input pixel); one convolution computes the four phases,
    which are then interleaved. Equal to the direct computation up to float rounding.
    """
    batch, _, height, width = x.shape
    out_channels, in_channels = weight.shape[:2]
    fold = torch.tensor(_FOLD, dtype=weight.dtype, device=weight.device)
    # (3x3 kernel position) -> (phase a, phase c, tap p, tap q), as one small matrix product.
    taps = torch.einsum("apy,cqx->yxacpq", fold, fold).reshape(9, 16)
    kernels = (weight.reshape(out_channels * in_channels, 9) @ taps).view(out_channels, in_channels, 2, 2, 2, 2)
    kernels = kernels.permute(2, 3, 0, 1, 4, 5).reshape(4 * out_channels, in_channels, 2, 2)
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, None if bias is None else bias.repeat(4))
    phases = phases.unflatten(1, (2, 2, out_channels))  # (B, a, c, O, H + 1, W + 1)
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        out = x.new_empty(batch, out_channels, height, 2, width, 2)
    else:  # keep a channels-last model channels-last
        out = x.new_empty(batch, height, 2, width, 2, out_channels).permute(0, 5, 1, 2, 3, 4)
    for a in (0, 1):
        for c in (0, 1):
            # Phase (a, c) reads padded rows a .. a + H and columns c .. c + W.
            out[:, :, :, a, :, c] = phases[:, a, c, :, a:a + height, c:c + width]
    return out.reshape(batch, out_channels, 2 * height, 2 * width)  # a view in both layouts


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
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
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
