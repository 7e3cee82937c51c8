"""Resolve a local folder or a Hugging Face Hub id to a local folder.

Hub ids go through huggingface_hub, so its cache, ``HF_HUB_OFFLINE``, ``HF_HOME`` and tokens all apply.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import LDMKitError
from .bundled import local_name

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".json", ".ckpt", ".bin"))


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
    **hub_options,
) -> Path:
    """Return a local folder for ``name_or_path``: a bundled model's folder (``ldmkit:NAME``), the folder itself,
    or the Hub snapshot (downloaded or cached). ``hub_options``: huggingface_hub's ``force_download``,
    ``token`` and ``proxies`` (which huggingface_hub 1.x ignores with a warning, as in diffusers)."""
    name_or_path = local_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise LDMKitError(f"{name} is a file; from_pretrained needs a model folder or a Hub id. "
                          "For an original CompVis .ckpt use from_single_file.")
    if not looks_like_hub_id(name):
        raise LDMKitError(f"No folder at {name}, and it is not a valid Hub id (owner/name). Check the path.")
    return _snapshot(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                     allow_patterns=allow_patterns, **hub_options)


def hub_file(repo_id: str, filename: str, **kwargs) -> Path:
    """Download (or take from the cache) one file of a Hub repo."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, **_hub_kwargs(**kwargs)))
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get the file"
        raise _hub_error(repo_id, e) from None


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def _hub_kwargs(revision=None, cache_dir=None, local_files_only=False, force_download=False, token=None,
                proxies=None):
    kwargs = {"revision": revision, "cache_dir": None if cache_dir is None else str(cache_dir),
              "local_files_only": bool(local_files_only) or offline_mode(), "force_download": force_download,
              "token": token}
    if proxies is not None:  # huggingface_hub 1.x drops it with a warning that says how to set proxies
        kwargs["proxies"] = proxies
    return kwargs


def _snapshot(repo_id, *, allow_patterns=None, **kwargs) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, **_hub_kwargs(**kwargs)))
    except Exception as e:
        raise _hub_error(repo_id, e) from None


def _hub_error(repo_id: str, e: Exception) -> LDMKitError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, LocalEntryNotFoundError):
        return LDMKitError(
            f"{repo_id!r} is not in the local Hugging Face cache and downloading is off or impossible "
            f"(HF_HUB_OFFLINE / local_files_only, or no network). Download it once with network access, "
            f"or pass a local folder. ({e.__class__.__name__})")
    if isinstance(e, RepositoryNotFoundError):
        return LDMKitError(f"No Hub repository {repo_id!r} (or it is private: log in with `hf auth login`).")
    if isinstance(e, RevisionNotFoundError):
        return LDMKitError(f"{repo_id!r} has no such revision: {e}")
    if isinstance(e, EntryNotFoundError):
        return LDMKitError(f"{repo_id!r} lacks a file: {e}")
    return LDMKitError(f"Could not fetch {repo_id!r} from the Hub: {e.__class__.__name__}: {e}")
