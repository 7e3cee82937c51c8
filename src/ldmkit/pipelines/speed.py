"""Two switches for a pipeline's networks that change speed, not the model: ``torch.compile`` and the
channels-last memory layout. Both were kept because they were measured to pay (benchmarks/bench_text2img.py
modes ``compiled`` and ``fast``; the figures are in the README); where they were measured not to pay they are
not applied.

``pipe.compile()``: each network's ``forward`` becomes an inductor-compiled function with *freezing* (the
weights are constants of the graph, so oneDNN's convolution weights are reordered into its blocked layout
once, at compile time, instead of at every call, and the convolutions fuse with their bias and activation).
On the full-size text-to-image UNet on one Xeon core: fp32 2.3 s per guided step against 2.9 s eager (and
diffusers' 3.0 s), at 4e-6 from eager; bf16 0.57 s against 1.0 s. The first call of each new input shape
compiles (about a minute for that UNet on one core), so it pays for a server or a long batch, not for one
image from a terminal. Freezing reads the weights at compile time: compile after loading them.

Channels-last (:func:`use_channels_last`): oneDNN's bf16 convolutions (AMX) run faster on NHWC activations
for the published model sizes, one core, bf16: the text-to-image UNet step 0.84 s against 1.0 s, the
super-resolution UNet on a 128 px tile 0.42 s against 0.53 s (192 px: 0.96 against 1.54), the VQ f4 decoder
on a 64 px latent tile 0.88 s against 1.81 s. The 64-96 channel emoji UNets ran 10 % slower, and fp32 was
4-7 % slower on every one of these networks; so it is applied to bf16 networks on a CPU at least
:data:`CHANNELS_LAST_MIN_WIDTH` channels wide, and to nothing else, whenever a pipeline is loaded or moved
(``from_pretrained``, ``from_single_file``, ``pipe.to``). It changes no parameter: only the memory order.
"""

from __future__ import annotations

import torch

from ..errors import LDMKitError

# The narrowest first-level width of a conv network for which channels-last paid in bf16 (measured: 320, the
# full-size text-to-image UNet, 1.19x; 160, the super-resolution UNet, 1.3-1.6x; 128, the VQ f4 decoder,
# 2.1x; 64, the emoji UNets, 0.9x).
CHANNELS_LAST_MIN_WIDTH = 128


def _first_width(module: torch.nn.Module) -> int:
    config = getattr(module, "config", None) or {}
    widths = config.get("block_out_channels") or ()
    return int(widths[0]) if widths else 0


def use_channels_last(pipe, enabled: bool = True) -> list[str]:
    """Put the wide bf16 conv networks of ``pipe`` (on a CPU) into channels-last (``enabled=False``: back to
    contiguous). Returns the names of the components it changed. Outputs differ from the contiguous layout
    only by float rounding (a different convolution algorithm), so exact (fp32) runs never use it."""
    changed = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module) or _first_width(module) < CHANNELS_LAST_MIN_WIDTH:
            continue
        if enabled and (module.dtype != torch.bfloat16 or module.device.type != "cpu"):
            continue
        module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        changed.append(name)
    return changed


def compile_pipeline(pipe, components: tuple[str, ...] | None = None, **compile_kwargs) -> list[str]:
    """Compile ``forward`` of the named networks (default: every UNet and autoencoder the pipeline has) with
    ``torch.compile(**compile_kwargs)`` and inductor's freezing. Returns the names compiled."""
    names = components if components is not None else tuple(n for n in ("unet", "vqvae") if n in pipe.components)
    for name in names:
        module = pipe.components.get(name)
        if not isinstance(module, torch.nn.Module):
            raise LDMKitError(f"pipe.compile: {type(pipe).__name__} has no network named {name!r}; choose from "
                              f"{', '.join(n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module))}.")
        if "forward" in vars(module):
            continue  # compiled already
        module.forward = _frozen(torch.compile(type(module).forward.__get__(module), **compile_kwargs))
    return list(names)


def uncompile_pipeline(pipe) -> None:
    """Back to eager ``forward`` for every network (undoes :func:`compile_pipeline`)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module) and getattr(vars(module).get("forward"), "_ldmkit_compiled", False):
            del module.forward


def _frozen(compiled):
    def forward(*args, **kwargs):
        # Freezing is read when a graph is compiled, which happens at the first call of each input shape; as a
        # patch here it applies to those compiles only, not to torch.compile elsewhere in the process. It
        # needs no autograd: the graph's weights become constants.
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), torch.no_grad():
            return compiled(*args, **kwargs)

    forward._ldmkit_compiled = True
    return forward
