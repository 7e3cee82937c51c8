"""Pipelines from and to the diffusers layout: ``model_index.json`` plus one sub-folder per component.

``model_index.json`` names the pipeline (``_class_name``) and each component (``[library, class name]``);
``ldmkit.registry`` says which ldmkit class each name means (classes join it when they are defined), and
``ldmkit.loading.diffusers_layout`` finds and reads the files. This module joins the two: it is the loader
behind ``DiffusionPipeline.from_pretrained`` and ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LDMKitError
from ..loading.diffusers_layout import component_entry, resolve_pipeline_folder, write_model_index
from ..pipelines import DiffusionPipeline
from ..registry import COMPONENTS, PIPELINES, register_loader


def pipeline_class(class_name, folder) -> type[DiffusionPipeline]:
    """The pipeline class that ``model_index.json``'s ``_class_name`` names."""
    cls = PIPELINES.get(class_name)
    if cls is None:
        raise LDMKitError(f"{folder}/model_index.json names pipeline {class_name!r}, which ldmkit does not "
                          f"implement (supported: {', '.join(PIPELINES.keys())}).")
    return cls


def component_class(library: str, class_name: str) -> type | None:
    """The class of a ``[library, class name]`` entry; a library ldmkit does not know falls back to the
    diffusers class of that name."""
    return COMPONENTS.get((library, class_name)) or COMPONENTS.get(("diffusers", class_name))


def load_component(folder: Path, name: str, entry, torch_dtype, variant):
    library, class_name = component_entry(folder, name, entry)
    cls = component_class(library, class_name)
    if cls is None:
        raise LDMKitError(f"{folder}/model_index.json: component {name!r} is a {library}.{class_name}, which "
                          "ldmkit does not implement.")
    sub = folder / name
    if not sub.is_dir():
        raise LDMKitError(f"{sub} is missing: the pipeline folder is incomplete. Re-download or re-save it.")
    if hasattr(cls, "from_folder"):
        return cls.from_folder(sub, torch_dtype=torch_dtype, variant=variant)
    return cls.from_pretrained(sub)


@register_loader("from_pretrained")
def load_pretrained(cls: type[DiffusionPipeline], name_or_path, *, torch_dtype, revision, cache_dir,
                    local_files_only, variant, components: dict) -> DiffusionPipeline:
    """``cls.from_pretrained(...)``: the pipeline ``model_index.json`` names, which must be a ``cls``; the
    components passed by keyword are used as they are instead of being loaded."""
    folder, index = resolve_pipeline_folder(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    pipeline_cls = pipeline_class(index.get("_class_name"), folder)
    if cls is not DiffusionPipeline and not issubclass(pipeline_cls, cls):
        raise LDMKitError(f"{folder} holds a {pipeline_cls.__name__}, not a {cls.__name__}. "
                          f"Load it with {pipeline_cls.__name__} or DiffusionPipeline.")
    unknown = set(components) - set(pipeline_cls.component_names())
    if unknown:
        raise LDMKitError(f"{pipeline_cls.__name__} has no component(s) {sorted(unknown)}; "
                          f"its components are {pipeline_cls.component_names()}.")
    loaded = {}
    for name in pipeline_cls.component_names():
        if name in components:
            loaded[name] = components[name]
            continue
        if name not in index:
            raise LDMKitError(f"{folder}/model_index.json lists no {name!r}, which "
                              f"{pipeline_cls.__name__} needs. The folder is incomplete.")
        loaded[name] = load_component(folder, name, index[name], torch_dtype, variant)
    return pipeline_cls(**loaded)


def on_disk_name(component) -> list[str]:
    """The [library, class name] that diffusers expects in model_index.json for ``component``: its class's
    registry key (or its nearest registered base's), else diffusers' name for a class of that name."""
    key = COMPONENTS.key_of(type(component))
    return list(key) if key is not None else ["diffusers", type(component).__name__]


@register_loader("save_pretrained")
def save_pretrained(pipe: DiffusionPipeline, folder, *, safe_serialization: bool) -> None:
    """``pipe.save_pretrained(folder)``: each component in its sub-folder, then ``model_index.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.save_pretrained(folder / name, safe_serialization=safe_serialization)
        else:
            component.save_pretrained(folder / name)
    entries = {name: on_disk_name(component) for name, component in pipe.components.items()}
    write_model_index(folder, type(pipe).__name__, entries)
