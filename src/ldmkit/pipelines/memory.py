"""Memory helpers of every pipeline, with diffusers' names: CPU offload, attention slicing, xformers' switch.

Offload keeps the networks on the CPU and runs them on an accelerator (own forward hooks; accelerate, which
diffusers uses, is not a dependency of ldmkit):

- ``enable_model_cpu_offload``: a whole component moves to the accelerator when it runs (its ``forward`` or
  one of its direct submodules: ``vqvae.decode`` runs ``vqvae.decoder``) and back to the CPU when another
  component runs or the pipeline call ends: one component on the accelerator at a time, and the UNet stays
  there for the whole denoising loop (as diffusers);
- ``enable_sequential_cpu_offload``: submodule by submodule: a submodule's weights (with those of its leaf
  children, which its forward may read directly) are on the accelerator only while its forward runs.

An offloaded component takes and returns tensors where its caller keeps them (the CPU): inputs move to the
accelerator as they enter the component and outputs move back as they leave it, so the pipelines' code is
the same with and without offload; per step only the latents and the conditioning cross the bus.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import LDMKitError
from ..loading.options import check_device_available
from ..models.attention import XFORMERS_MESSAGE
from ..models.attention_processor import AttnProcessor2_0

HOME = torch.device("cpu")


class MemoryMixin:
    """The memory methods of :class:`DiffusionPipeline` (it lists this class as a base)."""

    _offload = None

    def __init_subclass__(cls, **kwargs):
        """Every pipeline call ends with the offloaded components back on the CPU (diffusers' pipelines call
        ``maybe_free_model_hooks`` at the end of ``__call__``; here no pipeline has to remember to)."""
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None:
            cls.__call__ = _free_after(call)

    # ----------------------------------------------------------------- offload
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Components on the CPU, each moved whole to ``device`` (default: the CUDA or MPS accelerator, GPU
        ``gpu_id``) while it runs. Without an accelerator this warns and changes nothing: the pipeline runs
        on the CPU, where its components already are (diffusers raises; a warning keeps a GPU script running
        on a CPU machine). An explicit ``device`` that is not available is an error."""
        self._start_offload(_ModelOffload, gpu_id, device, "enable_model_cpu_offload")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: torch.device | str | None = None) -> None:
        """As :meth:`enable_model_cpu_offload`, submodule by submodule: the least accelerator memory (one
        submodule's weights at a time), the slowest (every weight crosses the bus at every use)."""
        self._start_offload(_SequentialOffload, gpu_id, device, "enable_sequential_cpu_offload")

    def _start_offload(self, kind: type, gpu_id, device, method: str) -> None:
        target = offload_device(gpu_id, device, method)
        self.remove_all_hooks()
        if target is None:
            return
        modules = {name: c for name, c in self.components.items() if isinstance(c, nn.Module)}
        self._offload = kind(modules, target)

    def remove_all_hooks(self) -> None:
        """Turn offload off: the hooks go, the components stay on the CPU."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    def maybe_free_model_hooks(self) -> None:
        """Offloaded components back on the CPU (every pipeline call ends with it)."""
        if self._offload is not None:
            self._offload.release()

    @property
    def _execution_device(self) -> torch.device:
        """Where the networks compute: the offload device while offload is on (diffusers' name)."""
        return self._offload.device if self._offload is not None else self.device

    # ----------------------------------------------------------------- attention
    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Sliced attention in every component that has it (the UNet): see ``unet.set_attention_slice``.
        SDPA's fused kernels already bound attention memory; slicing bounds it where SDPA falls back to its
        math kernel, and costs no memory where it does not."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.set_attention_slice(None)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for component in self.components.values():
            if hasattr(component, "set_attention_slice"):
                component.set_attention_slice(slice_size)

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """A warning, not an error: SDPA does xformers' job here, so the intent of the call (memory-efficient
        attention) is met by setting the SDPA processor everywhere, and scripts keep running."""
        warnings.warn(XFORMERS_MESSAGE, UserWarning, stacklevel=2)
        self._set_sdpa()

    def disable_xformers_memory_efficient_attention(self) -> None:
        self._set_sdpa()

    def _set_sdpa(self) -> None:
        for component in self.components.values():
            if hasattr(component, "set_attn_processor"):
                component.set_attn_processor(AttnProcessor2_0())


def _free_after(call: Callable) -> Callable:
    @functools.wraps(call)
    def wrapped(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            self.maybe_free_model_hooks()

    return wrapped


def offload_device(gpu_id: int | None, device, method: str) -> torch.device | None:
    """The device to offload to: ``device`` (with ``gpu_id`` as its index), else the accelerator present,
    else None with a warning."""
    if device is None:
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
        if kind is None:
            warnings.warn(f"{method}: there is no accelerator (CUDA or MPS) here, so the pipeline runs on the CPU, "
                          "where its components already are; nothing is offloaded. Pass device= to offload to "
                          "a given device.", UserWarning, stacklevel=4)
            return None
        device = kind
    device = torch.device(device)
    check_device_available(device, "device")
    if gpu_id is not None and (not isinstance(gpu_id, int) or gpu_id < 0):
        raise LDMKitError(f"gpu_id must be a non-negative int, got {gpu_id!r}.")
    if gpu_id is not None and device.index is not None:
        raise LDMKitError(f"{method}: gpu_id={gpu_id} and device={str(device)!r} both give a device index; "
                          f"pass one of them (device={device.type!r}, gpu_id={gpu_id}).")
    if device.type == "cpu":
        return device
    index = gpu_id if gpu_id is not None else device.index or 0
    if device.type == "cuda" and index >= torch.cuda.device_count():
        raise LDMKitError(f"{method}: there is no CUDA device {index}; {torch.cuda.device_count()} are visible.")
    return torch.device(device.type, index)


class _ModelOffload:
    """Whole components on the accelerator one at a time (see the module docstring)."""

    def __init__(self, components: dict[str, nn.Module], device: torch.device):
        self.device, self.components, self.resident = device, components, None
        self.handles = []
        for name, module in components.items():
            module.to(HOME)
            onload = functools.partial(self.onload, name)
            for part in (module, *module.children()):
                self.handles += _add_hooks(part, device, before=lambda _, onload=onload: onload())

    def onload(self, name: str) -> None:
        if self.resident != name:
            self.release()
            self.components[name].to(self.device)
            self.resident = name

    def release(self) -> None:
        if self.resident is not None:
            self.components[self.resident].to(HOME)
            self.resident = None

    def remove(self) -> None:
        self.release()
        for handle in self.handles:
            handle.remove()


class _SequentialOffload:
    """Each submodule's weights on the accelerator only while its forward runs (see the module docstring).

    The CPU tensors stay the weights' home: moving back is pointing each parameter at it again (no copy).
    A count per tensor keeps it on the accelerator while any forward that needs it runs (a parent and its
    leaf child both hold the child's weights).
    """

    def __init__(self, components: dict[str, nn.Module], device: torch.device):
        self.device = device
        self.placed: dict[int, list] = {}  # id(tensor) -> [home data, users]
        self.handles = []
        for module in components.values():
            module.to(HOME)
            boundary = {id(module), *(id(child) for child in module.children())}
            for part in module.modules():
                self.handles += _add_hooks(part, device, before=self.onload, after=self.offload,
                                           boundary=id(part) in boundary)

    def onload(self, module: nn.Module) -> list[torch.Tensor]:
        tensors = _held_tensors(module)
        for tensor in tensors:
            entry = self.placed.setdefault(id(tensor), [None, 0])
            if entry[1] == 0:
                entry[0] = tensor.data
                tensor.data = tensor.data.to(self.device)
            entry[1] += 1
        return tensors

    def offload(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            entry = self.placed[id(tensor)]
            entry[1] -= 1
            if entry[1] == 0:
                tensor.data, entry[0] = entry[0], None

    def release(self) -> None:
        """Nothing stays on the accelerator between forwards."""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters and buffers, and those of its leaf children (a forward may read a child's
    weight without calling it: the spatial transformer's 1x1 projections, the upsampler's convolution)."""
    owners = [module, *(child for child in module.children() if not child._modules)]
    return [t for owner in owners for t in (*owner._parameters.values(), *owner._buffers.values())
            if t is not None]


def _add_hooks(module: nn.Module, device: torch.device, before=None, after=None, boundary: bool = True) -> list:
    """Forward hooks: ``token = before(module)`` ahead of the forward and ``after(token)`` after it (even if it
    raises); on a ``boundary`` module, tensor inputs move to ``device`` and outputs back to where the inputs
    were (so that nested calls inside the component move nothing)."""
    stack = []

    def pre(mod, args, kwargs):
        source = _find_device((args, kwargs)) if boundary else None
        stack.append([source, None])
        if before is not None:
            stack[-1][1] = before(mod)
        if source is None or source == device:
            return None
        return _to_device(args, device), _to_device(kwargs, device)

    def post(mod, args, kwargs, output):
        source, token = stack.pop()
        if after is not None:
            after(token)
        if source is None or source == device:
            return None
        return _to_device(output, source)

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True)]


def _find_device(tree) -> torch.device | None:
    """The device of the first tensor in nested tuples / lists / dicts."""
    if isinstance(tree, torch.Tensor):
        return tree.device
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list | tuple) else ()
    for item in items:
        found = _find_device(item)
        if found is not None:
            return found
    return None


def _to_device(tree, device: torch.device):
    """``tree`` with every tensor moved to ``device``: tensors in tuples (named or not), lists, dicts and
    dataclass outputs (``UNet2DConditionOutput``, ``DecoderOutput``)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _to_device(getattr(tree, f.name), device)
                                            for f in dataclasses.fields(tree) if f.init})
    if isinstance(tree, dict):
        return type(tree)((key, _to_device(value, device)) for key, value in tree.items())
    if isinstance(tree, list):
        return [_to_device(item, device) for item in tree]
    if isinstance(tree, tuple):
        items = [_to_device(item, device) for item in tree]
        return tuple(items) if type(tree) is tuple else type(tree)(*items)
    return tree
