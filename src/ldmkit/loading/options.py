"""diffusers' loading keywords, sorted and checked once for every ``from_pretrained``.

A diffusers script passes ``DiffusionPipeline.from_pretrained`` / ``ModelMixin.from_pretrained`` keywords of
three kinds, and each gets what it means here:

- options with a meaning for ldmkit: the dtype (``dtype``, or its older spelling ``torch_dtype``; for a
  pipeline also ``{"unet": torch.bfloat16, "default": torch.float32}``), ``variant``, ``use_safetensors``,
  ``device_map``, ``low_cpu_mem_usage``, ``disable_mmap``, ``cache_converted`` (ldmkit's own),
  ``output_loading_info`` (models) and the Hub's ``revision``, ``cache_dir``, ``local_files_only``,
  ``force_download``, ``token``, ``proxies``;
- diffusers features ldmkit does not have (``custom_pipeline``, ONNX, quantization, accelerate's offload
  options, ...): accepted at the value that means "off", an error saying why otherwise (:data:`UNSUPPORTED`);
- anything else is a pipeline component passed by keyword, or an error naming the nearest valid keyword
  (diffusers would ignore it with a warning, and a misspelt ``use_safetensor=`` would silently do nothing).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LDMKitError

HUB_KEYS = ("revision", "cache_dir", "local_files_only", "force_download", "token", "proxies")
# cache_converted is ldmkit's own (``ldmkit.loading.converted``); the others are diffusers'.
COMMON_KEYS = ("dtype", "torch_dtype", "variant", "use_safetensors", "device_map", "low_cpu_mem_usage",
               "disable_mmap", "cache_converted", *HUB_KEYS)
MODEL_KEYS = (*COMMON_KEYS, "output_loading_info")

_NO_CODE = "ldmkit runs no code from repositories or diffusers' community folder; its pipelines are the LDM ones"
_NO_SPLIT = "ldmkit's models run whole on one device (pass device_map='cpu' or 'cuda'), so there is nothing to split"
# keyword -> (the values that mean "feature off", why ldmkit lacks the feature)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "custom_pipeline": ((None,), _NO_CODE),
    "custom_revision": ((None,), _NO_CODE),
    "trust_remote_code": ((False,), _NO_CODE + ", so there is nothing to trust"),
    "load_connected_pipeline": ((False,), "LDM pipelines have no connected (prior/decoder) pipelines"),
    "use_onnx": ((None, False), "ldmkit runs PyTorch weights only, not ONNX"),
    "provider": ((None,), "ldmkit runs PyTorch weights only, not ONNX"),
    "sess_options": ((None,), "ldmkit runs PyTorch weights only, not ONNX"),
    "provider_options": ((None,), "ldmkit runs PyTorch weights only, not ONNX"),
    "quantization_config": ((None,), "ldmkit does not quantize; load in float16 or bfloat16 with dtype="),
    "use_flashpack": ((False,), "ldmkit reads safetensors and weights-only pickles, not FlashPack files"),
    "flashpack_kwargs": ((None,), "ldmkit reads safetensors and weights-only pickles, not FlashPack files"),
    "max_memory": ((None,), _NO_SPLIT),
    "offload_folder": ((None,), _NO_SPLIT),
    "offload_state_dict": ((None, False), _NO_SPLIT),
    "parallel_config": ((None,), _NO_SPLIT),
    "ignore_mismatched_sizes": ((False,), "ldmkit loads strictly: weights that do not fit the config are an "
                                          "error, never silently re-initialised"),
    "mirror": ((None,), "diffusers ignores it too; set HF_ENDPOINT to use a Hub mirror"),
    "dduf_file": ((None,), "diffusers removed DDUF files; load the folder"),
}
# The device_map strategies that spread a model over several devices; ldmkit's LDM models are small enough to
# run on one, so each means "the accelerator if there is one, else the CPU" (what they give for one device).
SPREADING = {"pipeline": ("balanced",), "model": ("auto", "balanced", "balanced_low_0", "sequential")}


@dataclass(frozen=True)
class LoadOptions:
    """The loading options of one ``from_pretrained`` call, checked.

    ``dtype`` is a dtype (or its name), a per-component dict with an optional ``"default"`` (pipelines), or
    None (float32, as diffusers); ``device`` is where loaded models go (from ``device_map``), None for the CPU.
    """

    dtype: Any = None
    variant: str | None = None
    use_safetensors: bool | None = None
    device: torch.device | None = None
    disable_mmap: bool = False
    cache_converted: bool = False
    output_loading_info: bool = False
    hub: dict = field(default_factory=dict)

    def dtype_for(self, component: str):
        """The dtype component ``component`` loads in: as diffusers, a dict's entry, else its ``"default"``."""
        if isinstance(self.dtype, Mapping):
            return self.dtype.get(component, self.dtype.get("default"))
        return self.dtype

    def weight_patterns(self, prefix: str = "") -> list[str]:
        """Hub download patterns for a model folder: its configs and the weight format ``use_safetensors`` picks."""
        formats = {None: ("safetensors", "bin"), True: ("safetensors",), False: ("bin",)}[self.use_safetensors]
        return [f"{prefix}*.json", f"{prefix}*.txt"] + [f"{prefix}*.{ext}" for ext in formats]


def resolve_dtype(dtype, torch_dtype, where: str):
    """``dtype`` is diffusers' newer spelling of ``torch_dtype``; giving both is an error, as in diffusers."""
    if dtype is not None and torch_dtype is not None:
        raise LDMKitError(f"{where} got both dtype= and torch_dtype=; pass only dtype= (torch_dtype is its older "
                          "name).")
    return check_load_dtype(torch_dtype if dtype is None else dtype, where)


# The torch dtypes models can load and run in; float8 and the integer/complex types cannot run a UNet.
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_load_dtype(dtype, where: str):
    """Refuse a torch dtype no model can load in (``torch.int8`` used to fail deep inside torch's ``to``), also
    as a value of a per-component dict; names ("fp16", "auto") are left to the code that reads them."""
    values = dtype.values() if isinstance(dtype, Mapping) else (dtype,)
    for value in values:
        if isinstance(value, torch.dtype) and value not in LOADABLE_DTYPES:
            raise LDMKitError(f"{where}: dtype {value} cannot hold model weights; use torch.float32, torch.float16 "
                              "or torch.bfloat16 (quantized loading is not supported).")
    return dtype


def nearest(name: str, valid: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the valid name nearest ``name`` (empty when none is near)."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_unsupported(where: str, kwargs: dict) -> None:
    """Pop diffusers' keywords for features ldmkit lacks: fine at their "off" value, an error otherwise."""
    for key in [k for k in kwargs if k in UNSUPPORTED]:
        value = kwargs.pop(key)
        off, why = UNSUPPORTED[key]
        if not any(value is o or (o is not None and value == o and type(value) is type(o)) for o in off):
            raise LDMKitError(f"{where}: {key}={value!r} asks for a diffusers feature ldmkit does not have "
                              f"({why}). Drop the argument.")


def check_device_available(device: torch.device, option: str = "device_map") -> None:
    """``device`` exists on this machine; the error names the ``option`` that asked for it."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LDMKitError(f"{option} asks for {device}, but no CUDA GPU is available here; use {option}='cpu'.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LDMKitError(f"{option} asks for MPS, which is not available here; use {option}='cpu'.")


def _accelerator() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device_map(device_map, kind: str) -> torch.device | None:
    """The one device a diffusers ``device_map`` puts the weights on (``kind``: "pipeline" or "model")."""
    if device_map is None:
        return None
    if kind == "model" and isinstance(device_map, Mapping):
        if set(device_map) != {""}:
            raise LDMKitError(f"device_map={device_map!r} places submodules on different devices; {_NO_SPLIT}. "
                              "Pass one device, or {'': device}.")
        device_map = device_map[""]
    if kind == "model" and isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = torch.device("cuda", device_map)
    if isinstance(device_map, str) and device_map in SPREADING[kind]:
        return _accelerator()
    valid = ", ".join(repr(s) for s in ("cpu", "cuda", "mps", *SPREADING[kind]))
    try:
        device = torch.device(device_map)
    except (TypeError, RuntimeError):
        raise LDMKitError(f"device_map={device_map!r} is not a device or a strategy ldmkit knows; use one of "
                          f"{valid} (or a device like 'cuda:1').{nearest(str(device_map), SPREADING[kind])}") from None
    check_device_available(device)
    return device


def check_components(where: str, passed: dict, components: list[str], dtype=None) -> None:
    """The keywords of a pipeline's ``from_pretrained`` that are not loading options must be its components,
    and a dtype dict must name components (or ``"default"``)."""
    for key in passed:
        if key not in components:
            raise _unexpected(where, key, COMMON_KEYS, components)
    for key in dtype if isinstance(dtype, Mapping) else ():
        if key != "default" and key not in components:
            raise LDMKitError(f"{where}: the dtype dict names {key!r}, which is not a component (the components are "
                              f"{components}, plus 'default' for the rest).{nearest(str(key), components)}")


def _flag(kwargs: dict, key: str, default, allowed: tuple, where: str):
    value = kwargs.pop(key, default)
    if not any(value is a for a in allowed):
        raise LDMKitError(f"{where}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
    return value


def _unexpected(where: str, key: str, known: tuple[str, ...], components: list[str]) -> LDMKitError:
    if key == "subfolder" and components:
        return LDMKitError(f"{where} takes no subfolder (diffusers ignores it): pass the pipeline folder itself, "
                           "or load one model with its class, e.g. UNet2DConditionModel.from_pretrained(path, "
                           "subfolder='unet').")
    what = f" nor a component (it has no component {key!r}; its components are {components})" if components else ""
    return LDMKitError(f"{where} got {key}=, which is neither one of diffusers' loading options{what}."
                       f"{nearest(key, [*known, *components])} Loading options: {', '.join(known)}.")


def parse_load_kwargs(where: str, kwargs: dict, kind: str) -> tuple[LoadOptions, dict]:
    """Sort the keywords of a ``from_pretrained`` call (``kind`` "pipeline" or "model") into checked
    :class:`LoadOptions` and the rest: for a pipeline, the components passed by keyword (for
    :func:`check_components` once the pipeline class is known); a model takes none."""
    kwargs = dict(kwargs)
    check_unsupported(where, kwargs)
    known = MODEL_KEYS if kind == "model" else COMMON_KEYS
    rest = {k: kwargs.pop(k) for k in list(kwargs) if k not in known}
    if kind == "model":
        check_components(where, rest, [])
    dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None), where)
    if kind == "model" and isinstance(dtype, Mapping):
        raise LDMKitError(f"{where}: a dict of dtypes chooses one per pipeline component; a model takes one dtype "
                          "(dtype=torch.float16).")
    # Loading always assigns the weights to a network built on the meta device (what True asks for); False,
    # diffusers' random init then load, would give the same weights, and missing keys are an error either way.
    low_cpu_mem_usage = _flag(kwargs, "low_cpu_mem_usage", True, (True, False), where)
    device_map = kwargs.pop("device_map", None)
    if device_map is not None and not low_cpu_mem_usage:
        raise LDMKitError(f"{where}: low_cpu_mem_usage=False cannot be combined with device_map={device_map!r} "
                          "(as in diffusers); drop one of them.")
    variant = kwargs.pop("variant", None)
    if variant is not None and not (isinstance(variant, str) and variant and "." not in variant):
        raise LDMKitError(f"{where}: variant must be a name like 'fp16' (no dots), got {variant!r}.")
    options = LoadOptions(
        dtype=dtype, variant=variant, device=resolve_device_map(device_map, kind),
        use_safetensors=_flag(kwargs, "use_safetensors", None, (None, True, False), where),
        disable_mmap=_flag(kwargs, "disable_mmap", False, (True, False), where),
        cache_converted=_flag(kwargs, "cache_converted", False, (True, False), where),
        output_loading_info=_flag(kwargs, "output_loading_info", False, (True, False), where),
        hub={k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs})
    assert not kwargs, f"keywords left unsorted: {sorted(kwargs)}"
    return options, rest
