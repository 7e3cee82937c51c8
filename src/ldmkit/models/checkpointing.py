"""Gradient checkpointing of the networks' blocks (Chen et al. 2016, "Training deep nets with sublinear
memory cost"; diffusers' ``enable_gradient_checkpointing``).

A block that can be checkpointed runs its parts (residual blocks, attentions, transformer layers) through
:meth:`Checkpointed.run_part`. While the block's ``gradient_checkpointing`` is on and autograd records, a
part keeps only its inputs: the activations inside it are recomputed in the backward pass. That trades one
more forward pass of each part for the memory of its activations, with the same gradients (the
recomputation replays the same operations, and the RNG state is restored for dropout).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn


def checkpoint_call(module: nn.Module, *args):
    """The default checkpointing function: torch's non-reentrant checkpoint of ``module(*args)``.

    Non-reentrant (as diffusers uses it) so that inputs without gradients (the timestep embedding of a frozen
    stem, the conditioning of a frozen text encoder) still give the block's parameters their gradients.
    """
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


class Checkpointed:
    """Mixin of the ``nn.Module`` blocks whose parts can be checkpointed.

    ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` are the attributes diffusers' blocks have
    and that ``ModelMixin.enable_gradient_checkpointing`` sets; the function is called as ``func(part, *args)``.
    """

    gradient_checkpointing: bool = False
    _gradient_checkpointing_func: Callable = staticmethod(checkpoint_call)

    def run_part(self, part: nn.Module, *args):
        """``part(*args)``, checkpointed while gradient checkpointing is on and gradients are recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(part, *args)
        return part(*args)
