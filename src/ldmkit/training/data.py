"""Image folders for training: captions, class labels, crops and flips, and a resumable sharded sampler.

The folder follows Hugging Face's "imagefolder" convention: images anywhere below ``root``; captions in a
``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line) or ``metadata.csv`` next to them;
the class label of an image is the name of its first sub-folder, or a metadata column (``data.label_column``).
Only paths and captions are kept in memory, so the folder may be larger than memory. An unreadable image
is replaced by the next readable one (so every batch keeps its size and every process its place) and counted.

Randomness never depends on the process layout: the shuffle of epoch ``e`` comes from ``(seed, e)`` and
the crop/flip of an image from ``(seed, e, index)``, so 1 or N processes, with or without data-loader
workers, before or after a resume, see the same samples in the same places.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import LDMKitError
from ..io import parse_json_object
from .degradations import degrade

logger = logging.getLogger("ldmkit.training")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Give up after this many unreadable images in a row: the folder, not one file, is broken.
MAX_CONSECUTIVE_FAILURES = 64


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str | None
    label: int | None


@dataclass
class ImageFolder:
    records: list[Record]
    class_names: list[str]


def scan_folder(root: str | Path, caption_column: str = "text", caption_template: str | None = None,
                need_captions: bool = False, label_column: str | None = None,
                need_labels: bool = False) -> ImageFolder:
    """List the images below ``root`` with their captions and labels (sorted by path: a stable order).

    Labels are the first sub-folder's name, or with ``label_column`` that metadata column's value; the class
    ids follow the sorted names (numerically when every name is an integer)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LDMKitError(f"data.root {root} is not a folder. Point data.root at the folder of training images.")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not paths:
        raise LDMKitError(f"data.root {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Put the training "
                          "images there (sub-folders are class labels).")
    captions = read_captions(root, caption_column)
    if label_column is not None:
        named = read_column(root, label_column, "label")
        label_names = {p: named.get(p.resolve()) for p in paths}
    else:
        label_names = {p: p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None
                       for p in paths}
    class_names = sorted({n for n in label_names.values() if n is not None}, key=_class_order)
    label_of = {name: i for i, name in enumerate(class_names)}
    records = []
    for p in paths:
        label = None if label_names[p] is None else label_of[label_names[p]]
        caption = captions.get(p.resolve())
        if caption is None and caption_template is not None and label is not None:
            caption = caption_template.format(label=class_names[label].replace("_", " "))
        records.append(Record(p, caption, label))
    unknown = set(captions) - {p.resolve() for p in paths}
    if unknown:
        logger.warning("%d caption(s) in the metadata name files that are not images below %s (e.g. %s).",
                       len(unknown), root, sorted(unknown)[0])
    if need_captions:
        _require_captions(root, records, caption_column)
    if need_labels:
        _require_labels(root, records, label_column)
    return ImageFolder(records, class_names)


def _class_order(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _require_captions(root: Path, records: list[Record], caption_column: str) -> None:
    missing = [r.path.relative_to(root) for r in records if r.caption is None]
    if missing:
        raise LDMKitError(
            f"{len(missing)} of {len(records)} images in {root} have no caption (e.g. "
            f"{', '.join(str(m) for m in missing[:3])}). Text conditioning needs one per image: add lines "
            f'{{"file_name": "{missing[0].as_posix()}", "{caption_column}": "..."}} to {root}/metadata.jsonl, '
            "or set data.caption_template (e.g. 'a photo of a {label}') to caption by sub-folder.")


def _require_labels(root: Path, records: list[Record], label_column: str | None) -> None:
    missing = [r.path.relative_to(root) for r in records if r.label is None]
    if not missing:
        if len({r.label for r in records}) < 2:
            raise LDMKitError(f"Every image in {root} has the same class label: class conditioning needs at "
                              "least two classes. Check data.label_column or the sub-folders.")
        return
    where = (f'a "{label_column}" value in {root}/metadata.jsonl (e.g. {{"file_name": "{missing[0].as_posix()}", '
             f'"{label_column}": "..."}})' if label_column else
             "a class sub-folder (root/CLASS/image.png), or set data.label_column to a metadata column")
    raise LDMKitError(f"{len(missing)} of {len(records)} images in {root} have no class label (e.g. "
                      f"{', '.join(str(m) for m in missing[:3])}). Class conditioning needs one per image: "
                      f"give each {where}.")


def read_captions(root: Path, column: str) -> dict[Path, str]:
    """Captions from every metadata.jsonl / metadata.csv below ``root``; file_name is relative to its file."""
    return read_column(root, column, "caption")


def read_column(root: Path, column: str, what: str = "caption") -> dict[Path, str]:
    """``column`` of every metadata.jsonl / metadata.csv row below ``root``, by resolved image path. Captions
    must be strings; labels may be strings or integers (kept as their text)."""
    values: dict[Path, str] = {}
    for name in METADATA_FILES:
        for meta in sorted(root.rglob(name)):
            rows = _read_jsonl(meta) if name.endswith(".jsonl") else _read_csv(meta)
            for line, row in rows:
                if "file_name" not in row:
                    raise LDMKitError(f"{meta}:{line} has no 'file_name' (found keys {sorted(row)}). Each row "
                                      f"needs file_name and the {what} column.")
                if column not in row:
                    close = [k for k in row if k != "file_name"]
                    extra = (" For a folder `ldmkit data emoji` built, `ldmkit data emoji-labels "
                             f"{root.parent if root.name in ('train', 'test') else root}` adds the 'label' column."
                             if what == "label" else "")
                    raise LDMKitError(f"{meta}:{line} has no {what} column {column!r} (found {close}). Set "
                                      f"data.{what}_column to the column that holds the {what}s.{extra}")
                value = row[column]
                if what == "label" and isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if not isinstance(value, str):
                    raise LDMKitError(f"{meta}:{line}: the {what} must be a string, got {value!r}.")
                values[(meta.parent / str(row["file_name"])).resolve()] = value
    return values


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield number, parse_json_object(line, f"{path}:{number}", 'Each line must be one object '
                                            '{"file_name": ..., "text": ...}.')


def _read_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), 2)


def split_holdout(records: list, holdout: float, seed: int) -> tuple[list, list]:
    """Split off a held-out set: ``holdout`` < 1 is a fraction, otherwise a count. Same split for a seed."""
    n = len(records)
    count = int(round(holdout * n)) if holdout < 1 else int(holdout)
    if holdout > 0:
        count = max(count, 1)
    if count >= n:
        raise LDMKitError(f"data.holdout={holdout} holds out {count} of {n} images, leaving none to train on. "
                          "Lower data.holdout.")
    order = np.random.default_rng([seed, 7]).permutation(n)
    held = set(order[:count].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# ------------------------------------------------------------------------------------------- transforms


def load_rgb(path: Path) -> PIL.Image.Image:
    """Decode an image fully (so truncated files fail here) as RGB; transparency is composited on white."""
    with PIL.Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P") and ("transparency" in image.info or image.mode != "P"):
            image = image.convert("RGBA")
            background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")


def crop_and_flip(image: PIL.Image.Image, resolution: int, random_crop: bool, random_flip: bool,
                  rng: np.random.Generator, crop_size: int | None = None) -> PIL.Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased), crop a square of ``crop_size``
    (default: ``resolution``), maybe flip."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             PIL.Image.BICUBIC)
        w, h = image.size
    side = crop_size or resolution
    if random_crop:
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    else:
        left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range the autoencoders work in."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


# ---------------------------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """Items are looked up by ``(index, epoch)`` keys (from :class:`StepBatchSampler`), so augmentation is a
    pure function of the key. Returns ``pixel_values`` in [-1, 1], ``caption``, ``label``, ``skipped``
    (the indices of unreadable images passed over) and, with ``sr_scale``, ``lowres`` (the degraded low-res input)."""

    def __init__(self, records: list[Record], resolution: int, seed: int, random_crop: bool = True,
                 random_flip: bool = True, sr_scale: int | None = None, degradation: str = "bicubic",
                 crop_size: int | None = None):
        self.records = records
        self.resolution = resolution
        self.crop_size = crop_size
        self.seed = seed
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.sr_scale = sr_scale
        self.degradation = degradation
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = sample_rng(self.seed, epoch, index)
        for attempt in range(min(len(self.records), MAX_CONSECUTIVE_FAILURES)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                image = load_rgb(record.path)
            except Exception as e:  # noqa: BLE001 -- any decoder failure means "unreadable"
                self._warn(record.path, e)
                continue
            skipped = [(index + k) % len(self.records) for k in range(attempt)]
            return self.item(image, record, rng, skipped=skipped)
        raise LDMKitError(f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read (the last "
                          f"{record.path}); the data folder looks broken. Check data.root.")

    def item(self, image: PIL.Image.Image, record: Record, rng: np.random.Generator,
             skipped: list[int] | None = None) -> dict:
        image = crop_and_flip(image, self.resolution, self.random_crop, self.random_flip, rng, self.crop_size)
        out = {"pixel_values": to_tensor(image), "caption": record.caption or "",
               "label": -1 if record.label is None else record.label, "skipped": skipped or []}
        if self.sr_scale:
            out["lowres"] = to_tensor(degrade(image, self.sr_scale, self.degradation, rng))
        return out

    def _warn(self, path: Path, error: Exception) -> None:
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("Skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)


def collate(items: list[dict]) -> dict:
    out: dict = {"skipped": [i for item in items for i in item.get("skipped", [])]}
    for key in items[0]:
        if key == "skipped":
            continue
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "label":
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


# ---------------------------------------------------------------------------------------------- sampling


class StepBatchSampler(Sampler):
    """Yields this process's micro-batches of ``(index, epoch)`` keys, step by step from ``start_step``.

    Global step ``s`` takes the ``batch_size`` samples at positions ``[s * B, (s + 1) * B)`` of the
    epoch-wise shuffled stream (an epoch is ``len // B`` whole batches; the remainder is dropped). Inside
    a step, position ``p`` belongs to micro-step ``p // (world * micro)`` and process
    ``(p // micro) % world``: :meth:`rows` gives those positions, which index the step's random draws.
    """

    def __init__(self, num_samples: int, batch_size: int, accumulation: int, world_size: int, rank: int,
                 seed: int, start_step: int, max_steps: int):
        if batch_size % (accumulation * world_size):
            raise LDMKitError(
                f"train.batch_size={batch_size} must be divisible by gradient_accumulation_steps x processes = "
                f"{accumulation} x {world_size}; use e.g. batch_size={accumulation * world_size * max(1, round(batch_size / (accumulation * world_size)))}.")  # noqa: E501
        if num_samples < batch_size:
            raise LDMKitError(f"The dataset has {num_samples} training images, fewer than train.batch_size="
                              f"{batch_size}. Add images or lower train.batch_size.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.micro = batch_size // (accumulation * world_size)
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.steps_per_epoch = num_samples // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, micro_step: int) -> torch.Tensor:
        base = (micro_step * self.world_size + self.rank) * self.micro
        return torch.arange(base, base + self.micro)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_samples))
        return self._perm[1]

    def keys(self, step: int, micro_step: int) -> list[tuple[int, int]]:
        epoch = self.epoch_of(step)
        perm = self.permutation(epoch)
        offset = (step % self.steps_per_epoch) * self.batch_size
        return [(int(perm[offset + int(r)]), epoch) for r in self.rows(micro_step)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            for micro_step in range(self.accumulation):
                yield self.keys(step, micro_step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation


def make_loader(dataset: Dataset, sampler: StepBatchSampler, num_workers: int) -> torch.utils.data.DataLoader:
    # The loader's own generator: without one, starting to iterate draws its base seed from torch's global RNG,
    # which then feeds dropout one draw later in a resumed run than in the uninterrupted one (the data itself
    # never uses that seed: every draw comes from the step, see sample_rng).
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None,
                                       generator=torch.Generator().manual_seed(0))


__all__ = ["ImageDataset", "ImageFolder", "Record", "StepBatchSampler", "collate", "crop_and_flip", "load_rgb",
           "make_loader", "read_captions", "read_column", "scan_folder", "split_holdout", "to_tensor"]
