"""Drawing noise so that a seed means the same thing on every device and batch size."""

from __future__ import annotations

import torch

from .errors import LDMKitError

Generators = torch.Generator | list[torch.Generator] | None


def randn_tensor(shape, generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn as diffusers' ``randn_tensor`` draws it.

    A list of generators draws row ``i`` of the batch from ``generator[i]``, so an image depends only on
    its own seed, not on the batch it is in. Noise is drawn on the generator's device and then moved,
    so a CPU generator reproduces the same numbers whatever device the model runs on.
    """
    shape = tuple(shape)
    device = torch.device(device or "cpu")
    if isinstance(generator, list | tuple) and len(generator) == 1:
        generator = generator[0]  # as diffusers: one generator in a list serves the whole batch
    if isinstance(generator, list | tuple):
        if len(generator) != shape[0]:
            raise LDMKitError(f"Got {len(generator)} generators for a batch of {shape[0]}: pass one generator, "
                              f"or a list of exactly {shape[0]}.")
        rows = [_draw((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(rows, dim=0)
    return _draw(shape, generator, device, dtype)


def _draw(shape, generator, device, dtype):
    source = device if generator is None else generator.device
    if source.type != device.type and source.type != "cpu":
        raise LDMKitError(f"A generator on {source} cannot draw noise for {device}: make it on the CPU "
                          f"(torch.Generator('cpu')) or on {device}.")
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)
