"""Reading and writing state dicts: safetensors first, pickles only through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from ..errors import LDMKitError
from ..io import atomic_path

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a .safetensors file or a pickle, never executing code from the file."""
    path = Path(path)
    if not path.is_file():
        raise LDMKitError(f"Weight file {path} is missing. Re-download or re-save the model.")
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    if path.suffix in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LDMKitError(f"{path} is corrupt or truncated ({e}). Re-download or re-save it.") from None
    return _load_pickle(path)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LDMKitError(
            f"Refused to load {path}: it is a pickle that asks to run code or build objects other than "
            f"tensors ({str(e).splitlines()[0]}). ldmkit only loads weights safely (weights_only=True). "
            "Convert it with a trusted tool to .safetensors.") from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise LDMKitError(f"{path} is corrupt or truncated ({e.__class__.__name__}: {e}). "
                          "Re-download it.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LDMKitError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    return obj


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LDMKitError(f"{index_path} is not a valid shard index ({e}).") from None
    state = {}
    for shard in shards:
        state.update(load_state_dict(index_path.parent / shard))
    return state


def find_weights(folder: Path, stems: tuple[str, ...], variant: str | None = None) -> Path:
    """The weights file in ``folder``: safetensors before pickles, single files before shard indexes."""
    candidates = []
    for stem in stems:
        base = f"{stem}.{variant}" if variant else stem
        candidates += [f"{base}.safetensors", f"{base}.safetensors.index.json"]
    for stem in stems:
        base = f"{stem}.{variant}" if variant else stem
        candidates += [f"{base}.bin", f"{base}.bin.index.json"]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise LDMKitError(f"No weight file in {folder} (looked for {', '.join(candidates)}). "
                      "Re-download the model or re-save it with save_pretrained.")


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a state dict atomically as safetensors (tensors made contiguous and unshared)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    clean = {}
    for key, tensor in state.items():
        t = tensor.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr != -1:
            seen.add(ptr)
        clean[key] = t.cpu()
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"format": "pt", **(metadata or {})})
