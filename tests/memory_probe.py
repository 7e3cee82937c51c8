"""Peak memory of a block of torch code on any device, CPU included (which keeps no allocator statistics):
every storage that an operator creates counts from its creation until it is freed."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as probe: ...`` then ``probe.peak`` (bytes) and ``probe.largest`` (the largest one
    tensor's bytes). Tensors that existed before the block (weights, inputs) do not count."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set[int]) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._tracked or key in inputs or size == 0:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, size)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size
