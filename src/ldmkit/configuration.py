"""Config handling shared by models and schedulers.

A config is the set of keyword arguments of a class's ``__init__``; it is written to and read from the
same JSON files diffusers uses (``config.json``, ``scheduler_config.json``), with ``_class_name`` and
``_diffusers_version`` so that diffusers can read what we write.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import LDMKitError
from .io import atomic_write_text, parse_json_object

logger = logging.getLogger("ldmkit")

# The diffusers version we write into configs: the files are in that version's layout.
DIFFUSERS_LAYOUT_VERSION = "0.42.1"


class FrozenDict(dict):
    """A dict that also reads as attributes (``config.in_channels``) and refuses to be changed."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("configs are frozen; build a new object with from_config({**config, key: value})")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly  # type: ignore

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild through the constructor, not item assignment.
        return (type(self), (dict(self),))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy / torch values
        return value.tolist()
    return value


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LDMKitError(f"{path} is missing. Point to a folder saved with save_pretrained (or diffusers').")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LDMKitError(f"{path} is not valid JSON ({e}). Re-download or re-save the model.") from None
    return parse_json_object(text, str(path), "Re-download or re-save the model.")


class ConfigMixin:
    """Gives a class ``config``, ``from_config`` and ``save_config``.

    Subclasses call ``self.register_config(locals())`` first thing in ``__init__``.

    ``_inert_config_keys`` maps keys that diffusers writes but that select features we do not implement to
    the value that means "feature off". Such a key is accepted silently at that value and is an error
    otherwise, so an unsupported checkpoint fails loudly instead of loading into the wrong network.
    Keys that are neither parameters nor inert are ignored with a warning (e.g. newer diffusers fields).
    """

    config_name = "config.json"
    _inert_config_keys: dict[str, Any] = {}

    def register_config(self, init_locals: dict) -> None:
        params = inspect.signature(type(self).__init__).parameters
        config = {name: _jsonable(init_locals[name]) for name in params if name != "self" and name in init_locals}
        self._internal_config = FrozenDict(config)

    @property
    def config(self) -> FrozenDict:
        return self._internal_config

    @classmethod
    def _split_config(cls, config: Mapping) -> tuple[dict, dict]:
        params = inspect.signature(cls.__init__).parameters
        accepted = {k: v for k, v in config.items() if k in params and k != "self"}
        unknown = {}
        for key, value in config.items():
            if key in accepted or key.startswith("_"):
                continue
            if key in cls._inert_config_keys:
                if value != cls._inert_config_keys[key] and not (
                    isinstance(value, list | tuple) and list(value) == cls._inert_config_keys[key]
                ):
                    raise LDMKitError(
                        f"{cls.__name__} config sets {key}={value!r}, a feature ldmkit does not implement "
                        f"(supported: {cls._inert_config_keys[key]!r}). This checkpoint is not an LDM "
                        "architecture ldmkit can run."
                    )
                continue
            unknown[key] = value
        return accepted, unknown

    @classmethod
    def from_config(cls, config: Mapping | None = None, **overrides):
        """Build from a config dict (e.g. ``other.config``), with keyword overrides."""
        config = dict(config or {})
        config.update(overrides)
        accepted, unknown = cls._split_config(config)
        if unknown:
            logger.warning("%s ignores unknown config keys: %s", cls.__name__, ", ".join(sorted(unknown)))
        return cls(**accepted)

    @classmethod
    def load_config(cls, folder: str | os.PathLike) -> dict:
        return read_json(Path(folder) / cls.config_name)

    def config_to_json(self) -> str:
        data = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
        data.update(self.config)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_config(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / self.config_name, self.config_to_json())
