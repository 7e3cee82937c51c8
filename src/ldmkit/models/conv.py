"""3x3 convolutions for float32 inference on a CPU, each by the algorithm that is fastest for its shape.

``F.conv2d`` on a CPU runs oneDNN's direct convolution, which reorders the weight into its blocked layout at
every call. For the 1280-channel layers of the text-to-image UNet (59 MB of weights each) that reorder costs
more than the arithmetic on its 8x8 and 4x4 latents: 23-56 GFLOP/s against ~100 for the 320-channel layers
(one thread, measured; ``benchmarks/bench_conv.py``). Two other ways compute the same map from plain PyTorch
ops:

- **im2col + one GEMM**, the weight used as stored (no reorder): for large weights on few pixels;
- **Winograd F(2x2, 3x3)** (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8):
  ``Y = A^T [(G g G^T) * (B^T d B)] A`` on 4x4 input tiles, 16 multiplies per 2x2 output tile instead of 36,
  with the transformed weight ``G g G^T`` kept per layer (16/9 of the layer's weight, built at its first
  call, dropped when the weight changes or the module moves).

Both agree with the direct convolution to float rounding (~1e-6 relative on the full-size UNet; tested at
1e-5). They apply only where they were measured to be faster: float32 on a CPU, no gradient wanted, not
inside ``torch.compile`` (which picks its own kernels), kernel 3x3, stride 1, zero padding 1, no dilation
or groups. Everything else is ``F.conv2d``. ``model.set_conv_algorithm("direct")`` turns both off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LDMKitError

ALGORITHMS = ("auto", "direct")

# Winograd F(2x2, 3x3) matrices (Lavin & Gray 2016, sec. 4.1).
_BT = ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0))
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))

# Where each algorithm is faster than oneDNN's direct convolution (one thread, AVX-512; bench_conv.py).
# T = batch * height * width, the pixels one call computes.
IM2COL_MIN_WEIGHT = 8_000_000   # weights of >= 8 M elements (the UNet's 1280-channel layers) ...
IM2COL_MAX_PIXELS = 128         # ... on <= 128 pixels: 2.4x at 2x4x4, 1.35x at 2x8x8
WINOGRAD_MIN_PIXELS = 128       # >= 512 input channels from 128 pixels on (1.2-2.1x);
WINOGRAD_NARROW_CHANNELS = 256  # 256-511 channels only on 512-4096 pixels (1.1-1.3x; slower outside)
WINOGRAD_NARROW_PIXELS = (512, 4096)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and state_dict) whose float32 CPU inference takes the fastest
    exact algorithm for its shape (module docstring)."""

    conv_algorithm = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        algorithm = self._pick(input)
        if algorithm == "im2col":
            return conv3x3_im2col(input, self.weight, self.bias)
        if algorithm == "winograd":
            return conv3x3_winograd(input, self._winograd_weight(), self.bias)
        return super().forward(input)

    def _pick(self, x: torch.Tensor) -> str:
        if (self.conv_algorithm != "auto" or x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or self.kernel_size != (3, 3) or self.stride != (1, 1)
                or self.padding != (1, 1) or self.dilation != (1, 1) or self.groups != 1
                or self.padding_mode != "zeros" or torch.compiler.is_compiling()):
            return "direct"
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return "direct"  # training: autograd and oneDNN's backward kernels
        batch, channels, height, width = x.shape
        pixels = batch * height * width
        if self.weight.numel() >= IM2COL_MIN_WEIGHT and pixels <= IM2COL_MAX_PIXELS:
            return "im2col"
        if height % 2 or width % 2:
            return "direct"
        lo, hi = WINOGRAD_NARROW_PIXELS
        if (channels >= 2 * WINOGRAD_NARROW_CHANNELS and pixels >= WINOGRAD_MIN_PIXELS) or (
                channels >= WINOGRAD_NARROW_CHANNELS and lo <= pixels <= hi):
            return "winograd"
        return "direct"

    def _winograd_weight(self) -> torch.Tensor:
        weight = self.weight
        # Rebuilt when the weight is replaced or changed in place (load_state_dict, an optimizer step).
        key = (weight.data_ptr(), weight._version, weight.shape)
        cached = self.__dict__.get("_winograd")
        if cached is None or cached[0] != key:
            self.__dict__["_winograd"] = None  # free the old one before building the new one
            with torch.no_grad():
                cached = (key, winograd_weight(weight.detach()))
            self.__dict__["_winograd"] = cached
        return cached[1]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_winograd", None)  # .to(), .float(), .cuda(): the weight is a new tensor
        return super()._apply(fn, recurse)


def set_conv_algorithm(module: nn.Module, algorithm: str) -> None:
    """``"auto"`` (the default: the fastest exact algorithm per shape) or ``"direct"`` (always ``F.conv2d``,
    and the Winograd weights are released) for every :class:`Conv2d` in ``module``."""
    if algorithm not in ALGORITHMS:
        raise LDMKitError(f"Unknown conv algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}.")
    for layer in module.modules():
        if isinstance(layer, Conv2d):
            layer.conv_algorithm = algorithm
            if algorithm == "direct":
                layer.__dict__.pop("_winograd", None)


def conv3x3_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel as one matrix product over the unfolded
    input: ``(O, I*9) @ (I*9, B*H*W)``, the weight read as stored."""
    batch, channels, height, width = x.shape
    columns = F.unfold(x, 3, padding=1).permute(1, 0, 2).reshape(channels * 9, batch * height * width)
    matrix = weight.reshape(weight.shape[0], channels * 9)
    out = torch.mm(matrix, columns) if bias is None else torch.addmm(bias[:, None], matrix, columns)
    return out.view(-1, batch, height, width).permute(1, 0, 2, 3)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """``U = G g G^T`` for each (output, input) pair of a 3x3 weight, as ``(16, O, I)`` matrices."""
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    out_channels, in_channels = weight.shape[:2]
    return torch.einsum("ap,ocpq,bq->aboc", g, weight, g).reshape(16, out_channels, in_channels).contiguous()


def _tile_transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The input transform ``B^T d B`` as 16 4x4 filters, and the output transform ``A^T m A`` as a 4x16
    matrix (rows: the 2x2 outputs; columns: the 16 products)."""
    bt = torch.tensor(_BT, dtype=dtype, device=device)
    at = torch.tensor(_AT, dtype=dtype, device=device)
    tile_in = torch.einsum("ap,bq->abpq", bt, bt).reshape(16, 1, 4, 4)
    tile_out = torch.einsum("ia,jb->ijab", at, at).reshape(4, 16)
    return tile_in, tile_out


def conv3x3_winograd(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(2x2, 3x3); ``transformed`` is
    :func:`winograd_weight` of the weight; ``H`` and ``W`` even."""
    batch, channels, height, width = x.shape
    tiles_h, tiles_w = height // 2, width // 2
    out_channels = transformed.shape[1]
    tile_in, tile_out = _tile_transforms(x.dtype, x.device)
    # B^T d B for every 4x4 tile (stride 2) of every channel: one single-channel convolution.
    padded = F.pad(x, (1, 1, 1, 1)).reshape(batch * channels, 1, height + 2, width + 2)
    v = F.conv2d(padded, tile_in, stride=2).view(batch, channels, 16, tiles_h * tiles_w)
    v = v.permute(2, 1, 0, 3).reshape(16, channels, batch * tiles_h * tiles_w)
    m = torch.bmm(transformed, v)  # (16, O, B*tiles): the 16 elementwise products as matrix products
    y = torch.mm(tile_out, m.view(16, -1)).view(2, 2, out_channels, batch, tiles_h, tiles_w)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(batch, out_channels, height, width)
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1))
