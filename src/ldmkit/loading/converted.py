"""A disk cache of weights converted to another dtype, so that the next load maps them instead of converting.

A bfloat16 load of float32 weights reads every tensor and writes a new one: 5.8 GB read and 2.9 GB of new
memory for the full-size text-to-image model, 3-6 s on one core, most of it the kernel handing out fresh
pages. The converted tensors, written once as safetensors, load the next time as a memory map of pages the
page cache already holds: no conversion, and no new memory until a page is used. This is what OpenVINO's
model cache and torch.compile's cache do for their own conversions.

Only the loaders that users meet (the CLI and the server, through ``presets.load_pipeline``) turn it on, or a
``from_pretrained(..., cache_converted=True)``: the Python API's default writes nothing to disk, as
diffusers'. An entry is keyed by the source file's path and the target dtype, and records the size and
modification time of every source file: a changed source is converted again and its entry replaced, so there
is at most one entry per (weight file, dtype). The tensors are the bytes the conversion made, strides
included (channels-last tensors are stored in their memory order and viewed back), so a cached load gives
the same model bit for bit. A cache that cannot be written (no space, read-only) only costs the speed-up.

``LDMKIT_CONVERTED_CACHE`` sets the folder (default ``$XDG_CACHE_HOME/ldmkit/converted``, else
``~/.cache/ldmkit/converted``); ``0``, ``off`` or ``false`` turns the cache off everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .weights import LazyTensor, save_state_dict

log = logging.getLogger(__name__)
FORMAT = "1"  # bump when what an entry holds changes: older entries are then converted again
OFF = ("0", "off", "false", "no")
SPARE_BYTES = 2**30  # an entry is written only if the disk keeps this much free beside it


def cache_root() -> Path | None:
    """The cache folder, or None when ``LDMKIT_CONVERTED_CACHE`` turns the cache off."""
    value = os.environ.get("LDMKIT_CONVERTED_CACHE")
    if value is not None and value.strip().lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldmkit" / "converted"


def source_files(weights: Path) -> list[Path]:
    """The files a load reads: the weight file, or a shard index and its shards."""
    if not weights.name.endswith(".json"):
        return [weights]
    shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
    return [weights, *(weights.parent / shard for shard in shards)]


def fingerprint(weights: Path) -> str:
    """What the entry must have been made from: each source file's real path, size and modification time."""
    stats = [(str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns) for p in source_files(weights)]
    return json.dumps({"format": FORMAT, "sources": stats})


class ConvertedCache:
    """The cache entry of one load: ``weights`` (a file or shard index) converted to ``dtype``."""

    def __init__(self, root: Path, weights: Path, dtype: torch.dtype):
        self.weights, self.dtype = weights, dtype
        name = hashlib.sha256(f"{weights.resolve()}\n{dtype}".encode()).hexdigest()[:32]
        self.path = root / f"{name}.safetensors"

    @classmethod
    def for_load(cls, weights: Path, state: dict, dtype: torch.dtype, device) -> ConvertedCache | None:
        """The entry for this load, or None when it converts nothing (a load in the file's own dtype already
        maps the file), goes to an accelerator, or the cache is off."""
        root = cache_root()
        on_cpu = device is None or torch.device(device).type == "cpu"
        lazy = [v for v in state.values() if isinstance(v, LazyTensor)]
        converts = any(v.dtype.is_floating_point and v.dtype != dtype for v in lazy)
        if root is None or not on_cpu or not converts or len(lazy) != len(state):
            return None
        return cls(root, weights, dtype)

    def read(self) -> dict[str, torch.Tensor] | None:
        """The cached tensors (views of the mapped entry), or None if there is no valid entry."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("ldmkit_source") != fingerprint(self.weights) or meta.get("dtype") != str(self.dtype):
                return None
            permuted = set(json.loads(meta.get("channels_last", "[]")))
            state = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            log.warning("ignoring the damaged converted-weights cache entry %s (%s)", self.path, e)
            return None
        # Stored in memory order (O, H, W, I); the view back is the channels-last (O, I, H, W) tensor.
        return {k: v.permute(0, 3, 1, 2) if k in permuted else v for k, v in state.items()}

    def write(self, state: dict[str, torch.Tensor]) -> None:
        """Keep ``state`` (the converted model's tensors) for the next load; a failure only logs a warning."""
        size = sum(t.nbytes for t in state.values())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < size + SPARE_BYTES:
                log.warning("not caching converted weights in %s: the disk has too little free space for %d MB",
                            self.path.parent, size >> 20)
                return
            permuted = sorted(k for k, t in state.items() if _stored_channels_last(t))
            tensors = {k: t.permute(0, 2, 3, 1) if k in permuted else t for k, t in state.items()}
            meta = {"ldmkit_source": fingerprint(self.weights), "dtype": str(self.dtype),
                    "channels_last": json.dumps(permuted)}
            save_state_dict(tensors, self.path, metadata=meta)
        except OSError as e:
            log.warning("could not cache converted weights in %s (%s); the next load converts again",
                        self.path.parent, e)


def _stored_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last and not also plain contiguous (a 1x1 kernel can be both)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
