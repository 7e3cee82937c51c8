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
4-7 % slower on every one of these networks; so it is used for bf16 networks on a CPU at least
``ldmkit.hardware.CHANNELS_LAST_MIN_WIDTH`` channels wide, and for nothing else: such a network is stored
channels-last when it is loaded (in the same copy as the cast to bf16: models/modeling_utils.py) and when a
pipeline is moved to bf16 (``pipe.to``, through :func:`use_channels_last`). It changes no value, only the
memory order.
"""

from __future__ import annotations

import torch

from ..errors import LDMKitError
from ..hardware import prefers_channels_last


def use_channels_last(pipe, enabled: bool = True) -> list[str]:
    """Put the networks of ``pipe`` that run faster so (:func:`ldmkit.hardware.prefers_channels_last`) into
    channels-last (``enabled=False``: every conv network back to contiguous). Returns the names changed."""
    changed = []
    for name, module in pipe.components.items():
        config = getattr(module, "config", None) if isinstance(module, torch.nn.Module) else None
        if not (config or {}).get("block_out_channels"):
            continue
        if enabled and not prefers_channels_last(config, module.dtype, module.device):
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
