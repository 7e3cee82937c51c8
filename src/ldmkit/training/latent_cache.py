"""Encode the dataset to latents once, so LDM training skips the (frozen) encoder at every step.

The cache lives in ``<cache dir>/<key>``; the key hashes the autoencoder's weights and config, the image
list (paths, sizes, modification times) and the crop settings, so a retrained autoencoder or a changed
folder gets a new cache and an unchanged one is reused across runs. Each image is stored as the encoder's
output for the centre crop and, with flips on, for its mirror image: for the KL autoencoder the posterior's
moments (so every epoch still draws a fresh latent sample), for VQ the pre-quantisation latents. Storage is
one memory-mapped ``.npy`` shard per process, so the cache may exceed memory and any file system works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..errors import LDMKitError
from ..io import atomic_write_text, sha256_file
from ..loading.weights import find_weights
from ..models import AutoencoderKL
from .data import MAX_CONSECUTIVE_FAILURES, Record, crop_and_flip, load_rgb, sample_rng, to_tensor
from .degradations import degrade
from .faults import commit_folder, removed_on_error

INDEX = "index.json"
ENCODE_BATCH = 16


def default_cache_root() -> Path:
    return Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit")) / "latents"


def cache_key(ae_folder: Path, ae, records: list[Record], resolution: int, flip: bool) -> str:
    weights = find_weights(Path(ae_folder), type(ae).weights_stems)
    files = [(str(r.path.resolve()), r.path.stat().st_size, r.path.stat().st_mtime_ns) for r in records]
    spec = {"weights": sha256_file(weights), "config": dict(ae.config), "class": type(ae).__name__,
            "files": files, "resolution": resolution, "flip": flip, "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _encode(ae, images: torch.Tensor) -> torch.Tensor:
    if isinstance(ae, AutoencoderKL):
        return ae.encode(images).latent_dist.parameters  # mean and log-variance, stacked on channels
    return ae.encode(images).latents


def build_cache(run, ae, ae_folder: Path, records: list[Record], resolution: int, flip: bool,
                cache_root: Path | None) -> Path:
    """Collective: every process encodes a contiguous shard. Returns the (complete) cache folder."""
    key = cache_key(ae_folder, ae, records, resolution, flip)
    folder = Path(cache_root or default_cache_root()) / key
    if (folder / INDEX).is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    if run.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    run.barrier()
    bounds = np.linspace(0, len(records), run.world_size + 1).round().astype(int)
    start, stop = int(bounds[run.rank]), int(bounds[run.rank + 1])
    # A signal or an error (a full disk) while encoding leaves no half-built cache behind.
    with removed_on_error(partial, enabled=run.is_main):
        partial.mkdir(parents=True, exist_ok=True)
        _encode_shard(run, ae, records[start:stop], resolution, flip, partial / f"shard-{run.rank:05d}")
        run.barrier()
        if run.is_main:
            index = {"key": key, "count": len(records), "flip": flip, "resolution": resolution,
                     "shards": [[int(bounds[i]), int(bounds[i + 1]), f"shard-{i:05d}"]
                                for i in range(run.world_size)]}
            atomic_write_text(partial / INDEX, json.dumps(index, indent=1) + "\n")
            commit_folder(partial, folder)
    run.barrier()
    return folder


@torch.no_grad()
def _encode_shard(run, ae, records: list[Record], resolution: int, flip: bool, stem: Path) -> None:
    valid = np.zeros(len(records), dtype=bool)
    # The encoded shape, from a blank image: the shard files exist even if none of its images can be read.
    probe = _encode(ae, torch.zeros(1, 3, resolution, resolution, device=run.device))
    arrays = {name: np.lib.format.open_memmap(f"{stem}-{name}.npy", mode="w+", dtype=np.float32,
                                              shape=(len(records), *probe.shape[1:]))
              for name in (("plain", "flipped") if flip else ("plain",))}
    for start in range(0, len(records), ENCODE_BATCH):
        tensors, rows = [], []
        for i in range(start, min(start + ENCODE_BATCH, len(records))):
            try:
                image = load_rgb(records[i].path)
            except Exception:  # noqa: BLE001 -- unreadable: left invalid, skipped when training
                continue
            tensors.append(to_tensor(crop_and_flip(image, resolution, False, False, np.random.default_rng(0))))
            rows.append(i)
        if not rows:
            continue
        images = torch.stack(tensors).to(run.device)
        variants = {"plain": images, "flipped": images.flip(-1)} if flip else {"plain": images}
        for name, batch in variants.items():
            arrays[name][rows] = _encode(ae, batch).float().cpu().numpy()
        valid[rows] = True
    for array in arrays.values():
        array.flush()
    np.save(f"{stem}-valid.npy", valid)


class CachedLatentDataset(Dataset):
    """Items ``moments`` (see the module note), ``caption``, ``label``, ``skipped`` and, for
    super-resolution, the degraded ``lowres`` image of the same (centre) crop and flip."""

    def __init__(self, folder: Path, records: list[Record], seed: int, random_flip: bool,
                 sr_scale: int | None = None, degradation: str = "bicubic"):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        self.records = records
        self.seed = seed
        self.random_flip = random_flip and self.index["flip"]
        self.sr_scale = sr_scale
        self.degradation = degradation
        self._arrays: dict | None = None  # opened lazily, once per data-loader worker
        self.valid = np.concatenate([np.load(self.folder / f"{stem}-valid.npy") for _, _, stem in self.index["shards"]])
        if not self.valid.any():
            raise LDMKitError(f"None of the {len(records)} images could be read while building the latent cache "
                              f"{self.folder}. Check data.root.")

    def __len__(self) -> int:
        return len(self.records)

    def _row(self, index: int, flipped: bool) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {}
        for start, stop, stem in self.index["shards"]:
            if start <= index < stop:
                name = f"{stem}-{'flipped' if flipped else 'plain'}"
                if name not in self._arrays:
                    self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
                return np.array(self._arrays[name][index - start])
        raise IndexError(index)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = sample_rng(self.seed, epoch, index)
        flipped = self.random_flip and rng.random() < 0.5
        for skipped in range(min(len(self.records), MAX_CONSECUTIVE_FAILURES)):
            i = (index + skipped) % len(self.records)
            if not self.valid[i]:
                continue
            record = self.records[i]
            item = {"moments": torch.from_numpy(self._row(i, flipped)), "caption": record.caption or "",
                    "label": -1 if record.label is None else record.label,
                    "skipped": [(index + k) % len(self.records) for k in range(skipped)]}
            if self.sr_scale:
                image = crop_and_flip(load_rgb(record.path), self.index["resolution"], False, False, rng)
                if flipped:
                    image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
                item["lowres"] = to_tensor(degrade(image, self.sr_scale, self.degradation, rng))
            return item
        raise LDMKitError(f"{MAX_CONSECUTIVE_FAILURES} images in a row near index {index} could not be read when "
                          "the latent cache was built; the data folder looks broken.")
