"""ModelMixin: config + weights loading and saving in the diffusers folder layout."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..configuration import ConfigMixin, FrozenDict
from ..errors import LDMKitError
from ..hardware import auto_dtype, overflows_fp16, prefers_channels_last
from ..loading.converted import ConvertedCache
from ..loading.hub import resolve_folder
from ..loading.hub_upload import push_saved, upload_after_save
from ..loading.options import parse_load_kwargs
from ..loading.weights import LazyTensor, find_weights, open_state_dict, save_weights
from ..registry import COMPONENTS
from .checkpointing import checkpoint_call
from .conv import set_conv_algorithm

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype, device: torch.device | str | None = None, config=None) -> torch.dtype | None:
    """A dtype or its name; ``"auto"`` is what this machine runs fast on ``device`` (None: the CPU) for a
    model with ``config`` (``ldmkit.hardware.auto_dtype``; a config with ``force_upcast`` overflows float16)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device, fp16_overflows=overflows_fp16(config))
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise LDMKitError(f"Unknown dtype {dtype!r}; use torch.float32, torch.float16, torch.bfloat16 "
                       "or 'auto'.")


def _target(value: torch.Tensor | LazyTensor, dtype: torch.dtype | None, device) -> tuple[torch.dtype, torch.device]:
    """Where ``value`` goes: ``dtype`` if it is floating (else its own), ``device`` (None: where it is)."""
    own_device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
    return (dtype if dtype is not None and value.dtype.is_floating_point else value.dtype,
            torch.device(device) if device is not None else own_device)


def _cast(value: torch.Tensor | LazyTensor, dtype: torch.dtype | None, device, converting: bool,
          channels_last: bool = False) -> torch.Tensor:
    """``value`` read, in its target dtype and on its device (:func:`_target`). ``converting``: some tensors of
    the load are converted, so a file tensor that already fits is copied too (a view would keep its group's
    whole mapping resident, the converted tensors' source pages included)."""
    lazy = isinstance(value, LazyTensor)
    tensor = value.load(regroup=converting) if lazy else value
    dtype, device = _target(tensor, dtype, device)
    # Channels-last in the same copy as the cast (a second pass over the converted weights cost 3 s on the
    # full-size text-to-image model).
    layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.preserve_format
    if tensor.dtype == dtype and tensor.device == device and layout == torch.preserve_format:
        return tensor.clone() if converting and lazy else tensor
    return tensor.to(device=device, dtype=dtype, memory_format=layout)  # the one copy, from the file's pages


class ModelMixin(nn.Module, ConfigMixin):
    """Base of every network: ``from_pretrained`` / ``save_pretrained`` with diffusers' files.

    Parameter names equal diffusers' state_dict keys, so loading is a strict ``load_state_dict``. ``config``
    has diffusers' keys, those of features ldmkit lacks at their "off" value (:meth:`register_config`).
    """

    weights_stems: tuple[str, ...] = ("diffusion_pytorch_model",)
    # Regexes of keys that real checkpoints carry but the network does not use (ignored when loading).
    _ignored_checkpoint_keys: tuple[str, ...] = ()

    def __init_subclass__(cls, library: str = "diffusers", **kwargs):
        """Every network joins the component registry as ``[library, class name]``, the entry model_index.json
        gives it (``library="ldmkit"`` for ldmkit's own, which diffusers lacks)."""
        super().__init_subclass__(**kwargs)
        COMPONENTS.add((library, cls.__name__), cls)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters (each shared one once), as diffusers' ``ModelMixin.num_parameters``.

        only_trainable: count only those that require gradients.
        exclude_embeddings: leave out the weights of ``nn.Embedding`` layers (token, position, class tables).
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in embeddings and (p.requires_grad or not only_trainable))

    # ------------------------------------------------------------------------------ gradient checkpointing
    # Networks whose blocks are ``Checkpointed`` set this, as diffusers' classes do.
    _supports_gradient_checkpointing: bool = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them: less peak memory
        when training, one more forward pass, the same gradients (see :mod:`.checkpointing`).

        ``gradient_checkpointing_func(block_part, *args)`` replaces torch's non-reentrant checkpoint (as in
        diffusers). Inference (``torch.no_grad``) is unaffected.
        """
        if not self._supports_gradient_checkpointing:
            raise LDMKitError(f"{type(self).__name__} does not support gradient checkpointing (it has no "
                              "checkpointed blocks); train it without enable_gradient_checkpointing().")
        self._set_gradient_checkpointing(True, gradient_checkpointing_func or checkpoint_call)

    def disable_gradient_checkpointing(self) -> None:
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False, checkpoint_call)

    def _set_gradient_checkpointing(self, enable: bool, func: Callable) -> None:
        blocks = [m for m in self.modules() if hasattr(m, "gradient_checkpointing")]
        assert blocks, f"{type(self).__name__} says it supports gradient checkpointing but has no such block"
        for block in blocks:
            block.gradient_checkpointing = enable
            block._gradient_checkpointing_func = func

    # ------------------------------------------------------------------------------------- convolutions
    def set_conv_algorithm(self, algorithm: str) -> None:
        """``"auto"`` (the default): float32 CPU inference runs each 3x3 convolution by the fastest exact
        algorithm for its shape (im2col or Winograd F(2x2, 3x3), :mod:`ldmkit.models.conv`; outputs equal to
        float rounding, Winograd layers keep a transformed copy of their weight). ``"direct"``: always
        ``F.conv2d``, as diffusers, and the transformed weights are released."""
        set_conv_algorithm(self, algorithm)

    # ------------------------------------------------------------------------------------------- config
    def register_config(self, init_locals: dict) -> None:
        """The ``__init__`` arguments, plus diffusers' keys of the features ldmkit does not implement
        (``_inert_config_keys``) at the value that turns them off, so that ``config`` and config.json have
        diffusers' keys.

        ``inert_features`` (the ``**`` argument of the networks' ``__init__``) takes those keys when a
        network is built directly (``UNet2DConditionModel(**diffusers_unet.config)``): a key that asks for
        a missing feature is an error naming it, one that is not diffusers' at all a TypeError, as for any
        unknown keyword; ``_``-prefixed keys (``_class_name``) are dropped, as diffusers does.
        """
        init_locals = dict(init_locals)
        features = {k: v for k, v in (init_locals.pop("inert_features", None) or {}).items() if not k.startswith("_")}
        _, unknown = self._split_config(features)  # raises for a feature asked for
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got unexpected keyword arguments "
                            f"{', '.join(sorted(unknown))}")
        super().register_config(init_locals)
        self._internal_config = FrozenDict({**self._internal_config, **self._inert_config_keys})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        variant: str | None = None,
        **kwargs,
    ):
        """Load a model folder (diffusers layout) or Hub repo, or its ``subfolder`` (``subfolder="unet"``).

        Takes diffusers' loading keywords with their meaning (``ldmkit.loading.options``): ``dtype`` (or
        ``torch_dtype``; float32 by default, whatever the file holds), ``variant`` (``"fp16"`` reads
        ``diffusion_pytorch_model.fp16.safetensors``), ``use_safetensors``, ``device_map`` (a device, or
        "auto": the accelerator if there is one), ``low_cpu_mem_usage`` (loading never initialises weights
        it then overwrites, reads safetensors tensor by tensor straight into the dtype and onto the device,
        and a checkpoint that lacks keys is an error either way), ``disable_mmap``,
        ``output_loading_info`` (then ``(model, info)``; the lists are empty, since loading is strict) and the
        Hub's ``force_download``, ``token``, ``proxies``.
        """
        options, _ = parse_load_kwargs(f"{cls.__name__}.from_pretrained", {
            "torch_dtype": torch_dtype, "revision": revision, "cache_dir": cache_dir,
            "local_files_only": local_files_only, "variant": variant, **kwargs}, kind="model")
        prefix = f"{subfolder}/" if subfolder else ""
        folder = resolve_folder(name_or_path, allow_patterns=options.weight_patterns(prefix), **options.hub)
        model = cls.from_folder(folder / subfolder if subfolder else folder, torch_dtype=options.dtype,
                                variant=options.variant, use_safetensors=options.use_safetensors,
                                device=options.device, mmap=not options.disable_mmap,
                                cache_converted=options.cache_converted)
        if options.output_loading_info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def from_folder(cls, folder: Path, torch_dtype=None, variant: str | None = None,
                    use_safetensors: bool | None = None, device: torch.device | None = None, mmap: bool = True,
                    cache_converted: bool = False):
        """Load from a local folder (the options as :meth:`from_pretrained`'s, already checked).
        ``cache_converted``: keep weights converted to another dtype on disk, and map them on the next load
        instead of converting again (``ldmkit.loading.converted``)."""
        config = cls.load_config(folder)
        saved_class = config.get("_class_name")
        if saved_class is not None and saved_class != cls.__name__ and saved_class not in cls._compatible_classes():
            raise LDMKitError(f"{folder} holds a {saved_class}, not a {cls.__name__}. Load it with {saved_class}.")
        # "auto": for the device the weights go to; force_upcast counts at the class default when not saved
        torch_dtype = parse_dtype(torch_dtype, device, cls._with_defaults(config, "force_upcast"))
        weights = find_weights(folder, cls.weights_stems, variant, use_safetensors)
        state = open_state_dict(weights, mmap=mmap)
        cache = ConvertedCache.for_load(weights, state, torch_dtype or torch.float32, device) \
            if cache_converted and mmap else None
        cached = cache.read() if cache is not None else None
        model = cls.from_state_dict(config, state if cached is None else cached, torch_dtype=torch_dtype,
                                    source=str(folder if cached is None else cache.path), device=device)
        if cache is not None and cached is None:
            cache.write(model.state_dict())
        return model if device is None else model.to(device)

    @classmethod
    def _with_defaults(cls, config: dict, *keys: str) -> dict:
        """``config`` plus the ``__init__`` defaults of ``keys`` it does not hold (as the built model's config)."""
        params = inspect.signature(cls.__init__).parameters
        return {**{k: params[k].default for k in keys if k in params}, **config}

    @classmethod
    def _compatible_classes(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def from_state_dict(cls, config: dict, state: dict[str, torch.Tensor | LazyTensor], torch_dtype=None,
                        source="weights", device: torch.device | str | None = None):
        """Build the network on the meta device from a config and load ``state`` strictly, each tensor read,
        cast and placed on ``device`` in turn (no random init is wasted, no whole copy in the saved dtype)."""
        # "auto" here: for the device the weights go to (None: the CPU, where the network is built)
        torch_dtype = parse_dtype(torch_dtype, device, cls._with_defaults(config, "force_upcast"))
        with torch.device("meta"):
            model = cls.from_config(config)
        # As diffusers: float32 unless a dtype is asked for, whatever dtype the file was saved in.
        model.load_weights(state, source=source, dtype=torch_dtype or torch.float32, device=device)
        model.to(torch_dtype or torch.float32)  # a no-op for what load_weights filled: it is in the dtype already
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor | LazyTensor], source: str = "weights",
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Strict load: any missing or unexpected key is an error naming it.

        Tensors are taken one at a time (``LazyTensor`` handles are read then), floating ones cast to ``dtype``
        and all moved to ``device`` (None: each as it is), and the source dropped before the next: the peak
        memory is the loaded weights plus a twentieth of them (``SafetensorsReader``), not the file beside
        them. A tensor already in the dtype and on the device is kept as it is: a float32 load of float32
        safetensors keeps the memory-mapped file's pages, copying nothing."""
        ignored = [re.compile(p) for p in self._ignored_checkpoint_keys]
        state = {k: v for k, v in state.items() if not any(p.fullmatch(k) for p in ignored)}
        own = self.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise LDMKitError(
                f"{source} does not fit {type(self).__name__} with this config: "
                + (f"missing {len(missing)} keys (e.g. {', '.join(missing[:5])}); " if missing else "")
                + (f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:5])}). " if unexpected else "")
                + "The weights and config.json come from different models, or the file is damaged.")
        for key, param in own.items():
            if tuple(param.shape) != tuple(state[key].shape):
                raise LDMKitError(f"{source}: {key} has shape {tuple(state[key].shape)}, the config expects "
                                  f"{tuple(param.shape)}. The weights and config.json do not match.")
        # Keep the checkpoint's floating dtype unless asked otherwise; integer buffers keep theirs.
        lazy = [v for v in state.values() if isinstance(v, LazyTensor)]
        converting = any(_target(v, dtype, device) != (v.dtype, torch.device("cpu")) for v in lazy)
        # bf16 on a CPU: wide conv networks are stored channels-last, the order oneDNN runs fastest (hardware.py)
        channels_last = prefers_channels_last(getattr(self, "config", None), dtype, device)
        tensors = {key: _cast(state.pop(key), dtype, device, converting, channels_last) for key in own}
        self.load_state_dict(tensors, strict=True, assign=True)
        for reader in {v.reader for v in lazy}:
            reader.close()
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if tensor.is_meta:
                raise LDMKitError(f"{type(self).__name__}.{name} was not initialised by {source}.")

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str | None = None, push_to_hub: bool = False, **push_options) -> None:
        """Write config.json and the weights atomically, in the diffusers layout, as diffusers names them:
        ``diffusion_pytorch_model[.{variant}].safetensors`` (``.bin`` pickles with ``safe_serialization=False``),
        split into shards plus an index json past ``max_shard_size`` (default 10GB, as diffusers).
        ``push_to_hub=True`` then uploads the folder; ``push_options`` as :meth:`push_to_hub` (``repo_id``
        defaults to the folder's name)."""
        upload = upload_after_save(folder, push_to_hub, push_options, type(self).__name__)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        save_weights(self.state_dict(), folder, self.weights_stems, variant=variant, safe=safe_serialization,
                     max_shard_size=max_shard_size)
        if upload is not None:
            upload(folder)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None) -> str:
        """Upload the model to the Hub as diffusers does: ``save_pretrained`` into a temporary folder, then
        huggingface_hub's ``create_repo`` and one ``upload_folder`` commit (all the files or none). Offline
        (HF_HUB_OFFLINE) or without network it raises before anything is uploaded. Returns the commit's URL."""
        return push_saved(lambda d: self.save_pretrained(d, safe_serialization=safe_serialization, variant=variant),
                          repo_id, what=type(self).__name__, commit_message=commit_message, private=private,
                          token=token, create_pr=create_pr, subfolder=subfolder)
