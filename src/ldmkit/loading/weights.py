"""Reading and writing state dicts: safetensors first, pickles only through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import LDMKitError
from ..io import atomic_path, atomic_write_text

SAFE_SUFFIXES = (".safetensors",)
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' default for save_pretrained
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict from a .safetensors file, a shard index or a pickle, never executing code from the
    file. ``mmap=False`` (diffusers' ``disable_mmap=True``) reads safetensors whole instead of memory-mapping
    them, which is faster on network mounts."""
    path = Path(path)
    if not path.is_file():
        raise LDMKitError(f"Weight file {path} is missing. Re-download or re-save the model.")
    if path.name.endswith(".json"):
        return _load_sharded(path, mmap)
    check_not_text(path)
    if path.suffix in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load, load_file

        try:
            return load_file(str(path)) if mmap else load(path.read_bytes())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LDMKitError(f"{path} is corrupt or truncated ({e}). Re-download or re-save it.") from None
    return _load_pickle(path)


def open_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor | LazyTensor]:
    """A state dict whose safetensors entries are :class:`LazyTensor` handles, read one by one when loaded
    (``load_weights`` casts each to the target dtype and device before reading the next), so that a file is
    never held whole in its saved dtype beside the converted weights. Pickles, and safetensors with
    ``mmap=False``, are read whole, as :func:`load_state_dict` does."""
    path = Path(path)
    if not mmap or not path.is_file() or not (path.suffix in SAFE_SUFFIXES or path.name.endswith(".json")):
        return load_state_dict(path, mmap)
    if path.name.endswith(".json"):
        return _load_sharded(path, mmap, lazy=True)
    check_not_text(path)
    reader = SafetensorsReader(path)
    return {key: LazyTensor(reader, key, shape, dtype) for key, (shape, dtype) in reader.meta.items()}


class LazyTensor:
    """One tensor of a safetensors file, not read yet: its ``shape`` and ``dtype``, and :meth:`load`."""

    __slots__ = ("reader", "key", "shape", "dtype")

    def __init__(self, reader: SafetensorsReader, key: str, shape: torch.Size, dtype: torch.dtype):
        self.reader, self.key, self.shape, self.dtype = reader, key, shape, dtype

    def load(self, regroup: bool = True) -> torch.Tensor:
        """The tensor, a view of the memory-mapped file (no copy: pages are read as they are touched);
        ``regroup`` as :meth:`SafetensorsReader.read`."""
        return self.reader.read(self.key, regroup)


class SafetensorsReader:
    """Reads a .safetensors file tensor by tensor through safetensors' ``safe_open``.

    ``safe_open`` maps the whole file, and every page a tensor touched stays resident while the mapping lives.
    So the file is reopened (a new mapping; the old one unmapped once no view of it is left) after each
    ``1/GROUPS`` of its bytes: converting to another dtype then holds at most that much of the file at once
    (or its largest tensor) beside the converted weights. Views kept as they are (same dtype) keep their
    group's mapping, exactly as one ``load_file`` mapping would: a load that keeps them all (float32 from
    float32) reads without ``regroup``, in one mapping, since each mapping costs some pages of its own."""

    GROUPS = 40  # fp32 -> bf16: each group is 1/20 of the bf16 weights, the overshoot of the peak RSS

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path, self._open, self._handle, self._read = path, safe_open, None, 0
        try:
            with safe_open(str(path), framework="pt") as f:
                views = {key: f.get_tensor(key) for key in f.keys()}  # views: no data page is read
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LDMKitError(f"{path} is corrupt or truncated ({e}). Re-download or re-save it.") from None
        self.meta = {key: (t.shape, t.dtype) for key, t in views.items()}
        self.group_bytes = sum(t.nbytes for t in views.values()) // self.GROUPS

    def read(self, key: str, regroup: bool = True) -> torch.Tensor:
        if self._handle is None or (regroup and self._read >= self.group_bytes):
            self.close()
            self._handle = self._open(str(self.path), framework="pt")
        tensor = self._handle.get_tensor(key)
        self._read += tensor.nbytes
        return tensor

    def close(self) -> None:
        """Drop the current mapping (views still in use keep it alive until they go)."""
        self._handle, self._read = None, 0


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_not_text(path: Path) -> None:
    """Refuse a text file where weights should be, saying what it is: a git-lfs pointer (the repository was
    cloned without git-lfs), a saved web page or URL, or other text. Weight files are binary from their first
    bytes (safetensors' 8-byte header length, a zip or a pickle opcode), so the head alone decides."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(LFS_POINTER):
        raise LDMKitError(f"{path} is a git-lfs pointer, not the weights: the repository was cloned without "
                          "git-lfs. Run `git lfs install && git lfs pull` in it (or download the file itself).")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a character cut at the end of the head
            return  # binary: a weight file, or damage the loader reports
        text = head[: e.start].decode("utf-8")
    if not head or any(c not in "\t\n\r" and not c.isprintable() for c in text):
        return
    lower = text.lstrip().lower()
    if lower.startswith(("<!doctype html", "<html", "<?xml")):
        what = "an HTML/XML page (a download that saved an error or login page instead of the file)"
    elif lower.startswith(("http://", "https://", "[internetshortcut]")):
        what = f"a saved link ({text.split()[-1] if lower.startswith('[') else text.split()[0]!s:.120})"
    else:
        what = f"a text file starting {text.strip()[:40]!r}"
    raise LDMKitError(f"{path} is {what}, not model weights (a corrupt or truncated download?). Download the file "
                      "itself (.safetensors or .ckpt) and pass that.")


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


def _load_sharded(index_path: Path, mmap: bool = True, lazy: bool = False) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LDMKitError(f"{index_path} is not a valid shard index ({e}).") from None
    state = {}
    for shard in shards:
        state.update((open_state_dict if lazy else load_state_dict)(index_path.parent / shard, mmap))
    return state


def weights_name(stem: str, variant: str | None = None, safe: bool = True) -> str:
    """diffusers' (and transformers') file name: ``{stem}[.{variant}].safetensors`` (or ``.bin``)."""
    return f"{stem}{'.' + variant if variant else ''}.{'safetensors' if safe else 'bin'}"


def index_name(stem: str, variant: str | None = None, safe: bool = True) -> str:
    """The shard index's name: ``{stem}.safetensors.index[.{variant}].json``, the variant before ``.json``."""
    return f"{stem}.{'safetensors' if safe else 'bin'}.index{'.' + variant if variant else ''}.json"


def _weight_files(stem: str, variant: str | None) -> re.Pattern:
    """The names of ``variant``'s weight files for ``stem`` (a regex): single files, shards (also diffusers'
    legacy ``{stem}-00001-of-00002.{variant}.safetensors``) and shard indexes, in either format."""
    v = re.escape("." + variant) if variant else ""
    shard = r"-\d{5}-of-\d{5}"
    return re.compile(rf"{stem}(?:{v}(?:{shard})?|{shard}{v})\.(?:safetensors|bin)"
                      rf"|{stem}\.(?:safetensors|bin)\.index{v}\.json")


def has_variant(folder: Path, variant: str) -> bool:
    """Whether ``folder`` holds weights of ``variant`` under any name. As in diffusers, a pipeline loads the
    variant for the components that have it and the plain weights for the others."""
    pattern = _weight_files(r"[^.]+", variant)
    return folder.is_dir() and any(pattern.fullmatch(p.name) for p in folder.iterdir())


def find_weights(folder: Path, stems: tuple[str, ...], variant: str | None = None,
                 use_safetensors: bool | None = None) -> Path:
    """The weights file in ``folder``: safetensors before pickles, single files before shard indexes.
    ``use_safetensors`` as in diffusers: True takes only safetensors, False only pickles, None either."""
    formats = {None: (True, False), True: (True,), False: (False,)}[use_safetensors]
    candidates = [name for safe in formats for stem in stems
                  for name in (weights_name(stem, variant, safe), index_name(stem, variant, safe))]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    others = [p.name for p in sorted(folder.iterdir()) if p.suffix in (*SAFE_SUFFIXES, *PICKLE_SUFFIXES)
              or ".safetensors.index" in p.name or ".bin.index" in p.name] if folder.is_dir() else []
    hint = f" It holds {', '.join(others)}: pass the variant= / use_safetensors= they need." if others else ""
    raise LDMKitError(f"No weight file in {folder} (looked for {', '.join(candidates)}).{hint} "
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


def save_pickled_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict atomically as a torch pickle (``.bin``), its tensors on the CPU."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)


def save_weights(state: dict[str, torch.Tensor], folder: Path, stems: tuple[str, ...], *, variant: str | None = None,
                 safe: bool = True, max_shard_size: int | str | None = None) -> list[str]:
    """Write ``state`` in diffusers' layout and return the file names: ``{stem}[.{variant}].safetensors``
    (``stems[0]``; pickles take ``stems[-1]``, as transformers writes model.safetensors but pytorch_model.bin),
    or, past ``max_shard_size`` (bytes or a size like "10MB"; default diffusers' 10GB), shards
    ``{stem}[.{variant}]-00001-of-0000N.safetensors`` and the index that maps each key to its shard. The
    split is huggingface_hub's, the one diffusers and transformers use. Every file is written atomically; the
    weight files of this variant left by an earlier save are removed afterwards, since a stale single file
    would be loaded instead of new shards."""
    from huggingface_hub import split_torch_state_dict_into_shards

    stem = stems[0] if safe else stems[-1]
    name = weights_name(stem, variant, safe)
    ext = name.rsplit(".", 1)[1]
    try:
        split = split_torch_state_dict_into_shards(state, filename_pattern=name[: -len(ext) - 1] + "{suffix}." + ext,
                                                   max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except ValueError as e:
        raise LDMKitError(f"max_shard_size={max_shard_size!r} is not a size ({e}); pass bytes or a size like "
                          "'10MB'.") from None
    write = save_state_dict if safe else save_pickled_state_dict
    for filename, keys in split.filename_to_tensors.items():
        write({k: state[k] for k in keys}, folder / filename)
    written = set(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        written.add(index_name(stem, variant, safe))
        atomic_write_text(folder / index_name(stem, variant, safe), json.dumps(index, indent=2, sort_keys=True) + "\n")
    stale = [_weight_files(re.escape(s), variant) for s in stems]
    for path in folder.iterdir():
        if path.is_file() and path.name not in written and any(p.fullmatch(path.name) for p in stale):
            path.unlink()
    return sorted(written)
