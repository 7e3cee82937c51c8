"""Pipelines made of another pipeline's components (diffusers' ``from_pipe``), and the ``(library, class)``
entry that a pipeline's config and ``model_index.json`` give each component."""

from __future__ import annotations

import types
import typing

import torch

from ..errors import LDMKitError
from ..loading.options import check_unsupported, nearest, resolve_dtype
from ..registry import COMPONENTS


def component_entry(component) -> tuple:
    """``(library, class name)`` for ``component``: its class's registry key (or its nearest registered base's),
    else diffusers' name for a class of that name; ``(None, None)`` for a missing one, as diffusers."""
    if component is None:
        return (None, None)
    key = COMPONENTS.key_of(type(component))
    return tuple(key) if key is not None else ("diffusers", type(component).__name__)


def expected_classes(cls) -> dict[str, tuple[type, ...]]:
    """The classes that ``cls.__init__``'s annotations allow for each component (several for a union); a
    component without an annotation takes anything."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve constrains nothing
        return {}
    found = {}
    for name, hint in hints.items():
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        classes = tuple(c for c in (typing.get_args(hint) if union else (hint,)) if isinstance(c, type))
        if classes:
            found[name] = classes
    return found


def _misfit(cls, name: str, component, expected: dict) -> str | None:
    """Why ``component`` cannot be ``cls``'s ``name`` (None when it fits). As diffusers, only models are
    checked; a subclass of an expected class fits."""
    if name not in expected or not isinstance(component, torch.nn.Module) or isinstance(component, expected[name]):
        return None
    needs = " or ".join(c.__name__ for c in expected[name])
    return f"{name} is a {type(component).__name__}, where {cls.__name__} needs a {needs}"


def build_from_pipe(cls, pipeline, kwargs: dict):
    """``cls.from_pipe(pipeline, **kwargs)`` (see ``DiffusionPipeline.from_pipe``)."""
    where = f"{cls.__name__}.from_pipe"
    kwargs = dict(kwargs)
    dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None), where)
    check_unsupported(where, {k: kwargs.pop(k) for k in ("custom_pipeline", "custom_revision", "trust_remote_code")
                              if k in kwargs})
    names = cls.component_names()
    for key in kwargs:
        if key not in names:
            raise LDMKitError(f"{where} got {key}=, which is not a component of {cls.__name__} (its components "
                              f"are {names}).{nearest(key, names)}")
    expected, shared = expected_classes(cls), pipeline.components
    chosen, problems = {}, []
    for name in names:
        component = kwargs[name] if name in kwargs else shared.get(name)
        if component is None:
            problems.append(f"{type(pipeline).__name__} has no {name}")
            continue
        problem = _misfit(cls, name, component, expected)
        if problem:
            problems.append(problem)
        chosen[name] = component
    if problems:
        fix = ", ".join(f"{n}=..." for n in names if n not in chosen or _misfit(cls, n, chosen[n], expected))
        raise LDMKitError(f"{where}: the components of the {type(pipeline).__name__} do not fit a {cls.__name__}: "
                          f"{'; '.join(problems)}. Pass fitting ones by keyword: {where}(pipe, {fix}).")
    new = cls(**chosen)
    new._name_or_path = pipeline._name_or_path
    # The sampler's noise stream belongs to where the weights came from (original CompVis samplers).
    new.draw_noise_every_step = pipeline.draw_noise_every_step
    return new.to(dtype=torch.float32 if dtype is None else dtype)  # as diffusers: float32 unless given
