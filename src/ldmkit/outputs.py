"""Outputs that are a dataclass and an ordered dict at once, as diffusers' ``BaseOutput``.

Scripts written against diffusers read an output every way: ``out.images``, ``out["images"]``, ``out[0]``,
``out.to_tuple()``, ``out.keys()``. Fields that are None are left out of the dict view (and so out of the
tuple), as in diffusers, so ``out[0]`` is always the first field that holds something.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields
from typing import Any


class BaseOutput(OrderedDict):
    """Base of every ``@dataclass`` output: fields are attributes and dict items, kept in sync."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                OrderedDict.__setitem__(self, field.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def __reduce__(self):
        # The dict part is rebuilt by __post_init__: pickle only the fields.
        return type(self), tuple(getattr(self, field.name) for field in fields(self))

    def to_tuple(self) -> tuple:
        return tuple(OrderedDict.__getitem__(self, key) for key in self.keys())
