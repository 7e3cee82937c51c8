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
from ..loading.options import LoadOptions, check_components, parse_load_kwargs
from ..loading.weights import has_variant
from ..models import ModelMixin
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


def load_component(folder: Path, name: str, entry, options: LoadOptions, variant: str | None):
    """One component from its sub-folder: a model with the loading options (its dtype, ``variant`` where the
    folder has it), a tokenizer or scheduler from its files."""
    library, class_name = component_entry(folder, name, entry)
    cls = component_class(library, class_name)
    if cls is None:
        raise LDMKitError(f"{folder}/model_index.json: component {name!r} is a {library}.{class_name}, which "
                          "ldmkit does not implement.")
    sub = folder / name
    if not sub.is_dir():
        raise LDMKitError(f"{sub} is missing: the pipeline folder is incomplete. Re-download or re-save it.")
    if issubclass(cls, ModelMixin):
        return cls.from_folder(sub, torch_dtype=options.dtype_for(name), variant=variant,
                               use_safetensors=options.use_safetensors, device=options.device,
                               mmap=not options.disable_mmap, cache_converted=options.cache_converted)
    if hasattr(cls, "from_folder"):
        return cls.from_folder(sub)
    return cls.from_pretrained(sub)


def component_variants(folder: Path, names: list[str], variant: str | None) -> dict[str, str]:
    """The components that load ``variant``: as diffusers, those whose folder has its files (the others load
    their plain weights); an error when none has."""
    if variant is None:
        return {}
    found = {name: variant for name in names if has_variant(folder / name, variant)}
    if not found:
        raise LDMKitError(f"No component of {folder} has {variant!r} weights (files like "
                          f"diffusion_pytorch_model.{variant}.safetensors). Drop variant=, or write them with "
                          f"save_pretrained(folder, variant={variant!r}).")
    return found


def _pipeline_for(cls: type[DiffusionPipeline], place, index: dict, passed: dict, dtype) -> type[DiffusionPipeline]:
    """The pipeline class ``model_index.json`` names, checked: it must be a ``cls``, and the keywords that are
    not loading options must be its components."""
    pipeline_cls = pipeline_class(index.get("_class_name"), place)
    if cls is not DiffusionPipeline and not issubclass(pipeline_cls, cls):
        raise LDMKitError(f"{place} holds a {pipeline_cls.__name__}, not a {cls.__name__}. "
                          f"Load it with {pipeline_cls.__name__} or DiffusionPipeline.")
    check_components(f"{pipeline_cls.__name__}.from_pretrained", passed, pipeline_cls.component_names(), dtype)
    return pipeline_cls


@register_loader("from_pretrained")
def load_pretrained(cls: type[DiffusionPipeline], name_or_path, kwargs: dict) -> DiffusionPipeline:
    """``cls.from_pretrained(name_or_path, **kwargs)``: the pipeline ``model_index.json`` names, which must be a
    ``cls``, with diffusers' loading options (``ldmkit.loading.options``); the components passed by keyword
    are used as they are instead of being loaded."""
    options, passed = parse_load_kwargs(f"{cls.__name__}.from_pretrained", kwargs, kind="pipeline")
    if cls is not DiffusionPipeline:  # refuse a misspelt keyword before anything is downloaded
        check_components(f"{cls.__name__}.from_pretrained", passed, cls.component_names(), options.dtype)
    folder, index = resolve_pipeline_folder(  # checked before any weights are fetched
        name_or_path, use_safetensors=options.use_safetensors, **options.hub,
        check_index=lambda place, index: _pipeline_for(cls, place, index, passed, options.dtype))
    pipeline_cls = _pipeline_for(cls, folder, index, passed, options.dtype)
    names = pipeline_cls.component_names()
    variants = component_variants(folder, [n for n in names if n not in passed], options.variant)
    loaded = {}
    for name in names:
        if name in passed:
            loaded[name] = passed[name]
            continue
        if name not in index:
            raise LDMKitError(f"{folder}/model_index.json lists no {name!r}, which "
                              f"{pipeline_cls.__name__} needs. The folder is incomplete.")
        loaded[name] = load_component(folder, name, index[name], options, variants.get(name))
    pipe = pipeline_cls(**loaded)
    pipe._name_or_path = name_or_path
    return pipe


@register_loader("save_pretrained")
def save_pretrained(pipe: DiffusionPipeline, folder, *, safe_serialization: bool, variant: str | None = None,
                    max_shard_size: int | str | None = None) -> None:
    """``pipe.save_pretrained(folder)``: each component in its sub-folder (models with ``variant`` file names and
    ``max_shard_size`` shards, as diffusers), then ``model_index.json`` (``pipe.config``'s entries)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.save_pretrained(folder / name, safe_serialization=safe_serialization, variant=variant,
                                      max_shard_size=max_shard_size)
        else:
            component.save_pretrained(folder / name)
    entries = {name: list(entry) for name, entry in pipe.config.items() if not name.startswith("_")}
    write_model_index(folder, type(pipe).__name__, entries)
