"""The diffusers pipeline layout on disk: ``model_index.json`` plus one sub-folder per component.

This is the file side only: finding the folder (bundled, local or on the Hub, fetching only the files the
components need), reading and writing ``model_index.json``. Which classes its names mean is the registry's
business (``ldmkit.registry``), and building the pipeline is the assembly's (``ldmkit.assembly.pretrained``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..configuration import DIFFUSERS_LAYOUT_VERSION, read_json
from ..errors import LDMKitError
from ..io import atomic_write_text
from .bundled import local_name
from .hub import hub_file, looks_like_hub_id, resolve_folder


def resolve_pipeline_folder(name_or_path, *, use_safetensors: bool | None = None,
                            check_index: Callable[[Path | str, dict], None] | None = None, **hub_options):
    """Local folder and parsed model_index.json for a bundled name, a folder or a Hub id; only needed files are
    downloaded: the configs and the weights in the format ``use_safetensors`` asks for (None: safetensors,
    else the pickles). ``check_index(where, index)`` runs before any weights are fetched (to refuse a bad call
    without a download). ``hub_options``: ``revision``, ``cache_dir``, ``local_files_only``,
    ``force_download``, ``token``, ``proxies`` (see ``hub.resolve_folder``)."""
    check_index = check_index or (lambda where, index: None)
    name_or_path = local_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LDMKitError(f"{path} has no model_index.json, so it is not a pipeline folder. Point to the "
                              "folder save_pretrained wrote, or load a single model with its own class.")
        index = _read_index(path / "model_index.json")
        check_index(path, index)
        return path, index
    if path.exists() or not looks_like_hub_id(str(name_or_path)):
        resolve_folder(name_or_path, **hub_options)  # raises the right error for files and bad paths
    index = _read_index(hub_file(str(name_or_path), "model_index.json", **hub_options))
    check_index(str(name_or_path), index)
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    patterns = ["model_index.json"] + [f"{n}/*{ext}" for n in names for ext in (".json", ".txt")]
    weights = "bin" if use_safetensors is False else "safetensors"
    folder = resolve_folder(name_or_path, allow_patterns=patterns + [f"{n}/*.{weights}" for n in names],
                            **hub_options)
    # Old repos (like the published LDM ones) ship only .bin pickles: unless safetensors were required, fetch
    # those for the components that lack safetensors, and nothing else.
    missing = [n for n in names if _needs_pickles(folder / n)] if use_safetensors is None else []
    if missing:
        folder = resolve_folder(name_or_path, allow_patterns=patterns + [f"{n}/*.bin" for n in missing],
                                **hub_options)
    return folder, index


def _needs_pickles(sub: Path) -> bool:
    has_config = (sub / "config.json").is_file()
    return has_config and not any(sub.glob("*.safetensors"))


def _read_index(path) -> dict:
    index = read_json(path)
    if "_class_name" not in index:
        raise LDMKitError(f"{path} has no _class_name: it is not a pipeline's model_index.json.")
    return index


def component_entry(folder: Path, name: str, entry) -> tuple[str, str]:
    """The ``[library, class name]`` that ``model_index.json`` gives component ``name``, checked."""
    if not (isinstance(entry, list | tuple) and len(entry) == 2):
        raise LDMKitError(f"{folder}/model_index.json: entry {name!r} must be [library, class], got {entry!r}.")
    return entry[0], entry[1]


def write_model_index(folder: Path, pipeline_name: str, entries: dict[str, list[str]]) -> None:
    """``model_index.json`` for pipeline ``pipeline_name`` with ``entries``: component name -> [library, class]."""
    index = {"_class_name": pipeline_name, "_diffusers_version": DIFFUSERS_LAYOUT_VERSION, **entries}
    atomic_write_text(Path(folder) / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()
