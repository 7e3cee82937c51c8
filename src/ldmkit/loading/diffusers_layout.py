"""The diffusers pipeline layout: ``model_index.json`` plus one sub-folder per component.

``model_index.json`` maps each component name to ``[library, class name]``; the tables below are the
explicit correspondence between those on-disk names and ldmkit's classes, in both directions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..configuration import DIFFUSERS_LAYOUT_VERSION, read_json
from ..errors import LDMKitError
from ..io import atomic_write_text
from .hub import hub_file, resolve_folder


def _pipeline_classes() -> dict:
    from .. import pipelines as p

    return {name: getattr(p, name) for name in p.PIPELINE_NAMES}


def _component_classes() -> dict[tuple[str, str], type]:
    """(library, class name) as written in model_index.json -> ldmkit class."""
    from .. import models, schedulers, tokenizer

    table: dict[tuple[str, str], type] = {}
    for name in models.MODEL_NAMES:
        table[("diffusers", name)] = getattr(models, name)
    for name in models.LDMKIT_MODEL_NAMES:
        table[("ldmkit", name)] = getattr(models, name)
    for name in schedulers.__all__:
        if name.endswith("Scheduler"):
            table[("diffusers", name)] = getattr(schedulers, name)
    table[("latent_diffusion", "LDMBertModel")] = models.LDMBertModel
    table[("transformers", "BertTokenizer")] = tokenizer.LDMTokenizer
    table[("transformers", "BertTokenizerFast")] = tokenizer.LDMTokenizer
    return table


def on_disk_name(component) -> list[str]:
    """The [library, class name] that diffusers expects in model_index.json for ``component``."""
    from .. import models, tokenizer

    name = type(component).__name__
    if isinstance(component, tokenizer.LDMTokenizer):
        return ["transformers", "BertTokenizer"]
    if name == "LDMBertModel":
        return ["latent_diffusion", "LDMBertModel"]
    if name in models.LDMKIT_MODEL_NAMES:
        return ["ldmkit", name]
    return ["diffusers", name]


def pipeline_class(class_name, folder):
    classes = _pipeline_classes()
    if class_name not in classes:
        raise LDMKitError(f"{folder}/model_index.json names pipeline {class_name!r}, which ldmkit does not "
                          f"implement (supported: {', '.join(sorted(classes))}).")
    return classes[class_name]


def resolve_pipeline_folder(name_or_path, *, revision=None, cache_dir=None, local_files_only=False):
    """Local folder and parsed model_index.json for a bundled name, a folder or a Hub id; only needed files are
    downloaded."""
    from .bundled import local_name

    name_or_path = local_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LDMKitError(f"{path} has no model_index.json, so it is not a pipeline folder. Point to the "
                              "folder save_pretrained wrote, or load a single model with its own class.")
        return path, _read_index(path / "model_index.json")
    hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}
    if path.exists() or not _is_hub_id(str(name_or_path)):
        resolve_folder(name_or_path, **hub_kwargs)  # raises the right error for files and bad paths
    index = _read_index(hub_file(str(name_or_path), "model_index.json", **hub_kwargs))
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    patterns = ["model_index.json"] + [f"{n}/*{ext}" for n in names for ext in (".json", ".txt", ".safetensors")]
    folder = resolve_folder(name_or_path, allow_patterns=patterns, **hub_kwargs)
    # Old repos (like the published LDM ones) ship only .bin pickles: fetch those for components that lack
    # safetensors, and nothing else.
    missing = [n for n in names if _needs_pickles(folder / n)]
    if missing:
        folder = resolve_folder(name_or_path, allow_patterns=patterns + [f"{n}/*.bin" for n in missing],
                                **hub_kwargs)
    return folder, index


def _is_hub_id(name: str) -> bool:
    from .hub import looks_like_hub_id

    return looks_like_hub_id(name)


def _needs_pickles(sub: Path) -> bool:
    has_config = (sub / "config.json").is_file()
    return has_config and not any(sub.glob("*.safetensors"))


def _read_index(path) -> dict:
    index = read_json(path)
    if "_class_name" not in index:
        raise LDMKitError(f"{path} has no _class_name: it is not a pipeline's model_index.json.")
    return index


def load_component(folder: Path, name: str, entry, torch_dtype, variant):
    if not (isinstance(entry, list | tuple) and len(entry) == 2):
        raise LDMKitError(f"{folder}/model_index.json: entry {name!r} must be [library, class], got {entry!r}.")
    library, class_name = entry
    table = _component_classes()
    cls = table.get((library, class_name)) or table.get(("diffusers", class_name))
    if cls is None:
        raise LDMKitError(f"{folder}/model_index.json: component {name!r} is a {library}.{class_name}, which "
                          "ldmkit does not implement.")
    sub = folder / name
    if not sub.is_dir():
        raise LDMKitError(f"{sub} is missing: the pipeline folder is incomplete. Re-download or re-save it.")
    if hasattr(cls, "from_folder"):
        return cls.from_folder(sub, torch_dtype=torch_dtype, variant=variant)
    return cls.from_pretrained(sub)


def write_model_index(folder: Path, pipeline_name: str, components: dict) -> None:
    index = {"_class_name": pipeline_name, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
    for name, component in components.items():
        index[name] = on_disk_name(component)
    atomic_write_text(Path(folder) / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()
