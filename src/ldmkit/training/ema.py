"""Exponential moving average of the weights, which is what the published LDMs sample with."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import LDMKitError


class EMA:
    """``theta_ema <- d theta_ema + (1 - d) theta`` after every optimizer step.

    The decay warms up as ``d_n = min(decay, (1 + n) / (10 + n))`` (n = updates so far), the schedule of the
    original LDM code, so that early averages are not dominated by the random initialisation.
    Floating-point parameters and buffers are tracked in float32.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in self._tensors(module)}

    @staticmethod
    def _tensors(module: nn.Module):
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.dtype.is_floating_point:
                yield name, tensor

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        names, live = zip(*self._tensors(module))
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [t.detach().float() for t in live], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, tensor in self._tensors(module):
            tensor.data.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """Temporarily load the averaged weights into ``module`` (for sampling and evaluation)."""
        backup = {name: t.detach().clone() for name, t in self._tensors(module)}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, tensor in self._tensors(module):
                    tensor.data.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            # A checkpoint of another model (the live weights are checked first, so this is a rare mismatch).
            raise LDMKitError(f"The checkpoint's EMA weights lack {len(missing)} tensor(s) of this model, e.g. "
                              f"{sorted(missing)[:3]}: it comes from a different recipe. Resume with the recipe "
                              "the run started with (saved in its recipe.yaml), or start a new output_dir.")
        self.num_updates = int(state["num_updates"])
        for name in self.shadow:
            self.shadow[name].copy_(state["shadow"][name])
