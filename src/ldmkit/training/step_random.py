"""Random draws of one optimizer step that do not depend on how the batch is split.

Every draw (timesteps, noise, caption dropout, posterior samples, inpainting masks) is made for the whole global batch
from a generator seeded by ``(seed, step, stream)``, then each process keeps the rows of its own samples.
One process, N processes or N micro-steps of gradient accumulation therefore train on exactly the same
numbers, and a resumed run draws what the uninterrupted run drew, with no generator state to restore.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed from ``(seed, step, stream)`` (SeedSequence mixes them, so nearby steps are unrelated)."""
    state = np.random.SeedSequence([seed, step, zlib.crc32(stream.encode())]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class StepRandom:
    def __init__(self, seed: int, step: int, batch_size: int):
        self.seed = seed
        self.step = step
        self.batch_size = batch_size
        self._cache: dict[tuple, torch.Tensor] = {}

    def _draw(self, stream: str, kind: str, shape: tuple, high: int = 0) -> torch.Tensor:
        key = (stream, kind, shape, high)
        if key not in self._cache:
            gen = torch.Generator().manual_seed(step_seed(self.seed, self.step, stream))
            size = (self.batch_size, *shape)
            if kind == "randn":
                self._cache[key] = torch.randn(size, generator=gen)
            elif kind == "rand":
                self._cache[key] = torch.rand(size, generator=gen)
            else:
                self._cache[key] = torch.randint(0, high, size, generator=gen)
        return self._cache[key]

    def randn(self, stream: str, shape, rows: torch.Tensor, device=None) -> torch.Tensor:
        """Standard normal noise of per-sample ``shape`` for the samples at global ``rows``."""
        return self._draw(stream, "randn", tuple(shape))[rows].to(device)

    def rand(self, stream: str, rows: torch.Tensor, device=None) -> torch.Tensor:
        return self._draw(stream, "rand", ())[rows].to(device)

    def randint(self, stream: str, high: int, rows: torch.Tensor, device=None) -> torch.Tensor:
        return self._draw(stream, "randint", (), high)[rows].to(device)

    def generator(self, stream: str, row: int) -> np.random.Generator:
        """A numpy generator for the sample at global ``row`` (for draws of varying count, such as the strokes
        of an inpainting mask): seeded by ``(seed, step, stream, row)``, so as layout-free as the tensors."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.step, zlib.crc32(stream.encode()),
                                                             int(row)]))
