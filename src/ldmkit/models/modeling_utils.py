"""ModelMixin: config + weights loading and saving in the diffusers folder layout."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..configuration import ConfigMixin, FrozenDict
from ..errors import LDMKitError
from ..io import atomic_path
from ..loading.hub import resolve_folder
from ..loading.weights import find_weights, load_state_dict, save_state_dict
from ..registry import COMPONENTS
from .checkpointing import checkpoint_call

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise LDMKitError(f"Unknown dtype {dtype!r}; use torch.float32, torch.float16 or torch.bfloat16.")


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
    ):
        patterns = None if subfolder is None else [f"{subfolder}/*"]
        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, allow_patterns=patterns)
        if subfolder:
            folder = folder / subfolder
        return cls.from_folder(folder, torch_dtype=torch_dtype, variant=variant)

    @classmethod
    def from_folder(cls, folder: Path, torch_dtype=None, variant: str | None = None):
        config = cls.load_config(folder)
        saved_class = config.get("_class_name")
        if saved_class is not None and saved_class != cls.__name__ and saved_class not in cls._compatible_classes():
            raise LDMKitError(f"{folder} holds a {saved_class}, not a {cls.__name__}. Load it with {saved_class}.")
        state = load_state_dict(find_weights(folder, cls.weights_stems, variant))
        return cls.from_state_dict(config, state, torch_dtype=torch_dtype, source=str(folder))

    @classmethod
    def _compatible_classes(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def from_state_dict(cls, config: dict, state: dict[str, torch.Tensor], torch_dtype=None, source="weights"):
        """Build the network from a config and load ``state`` strictly (no random init is wasted)."""
        torch_dtype = parse_dtype(torch_dtype)
        with torch.device("meta"):
            model = cls.from_config(config)
        model.load_weights(state, source=source)
        # As diffusers: float32 unless a dtype is asked for, whatever dtype the file was saved in.
        model.to(torch_dtype or torch.float32)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Strict load: any missing or unexpected key is an error naming it."""
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
        self.load_state_dict(state, strict=True, assign=True)
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if tensor.is_meta:
                raise LDMKitError(f"{type(self).__name__}.{name} was not initialised by {source}.")

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write config.json and the weights (safetensors) atomically, in the diffusers layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        stem = self.weights_stems[0]
        if safe_serialization:
            save_state_dict(self.state_dict(), folder / f"{stem}.safetensors")
        else:
            save_pickled_state_dict(self.state_dict(), folder / f"{stem}.bin")


def save_pickled_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict atomically as a torch pickle (``.bin``), its tensors on the CPU."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
