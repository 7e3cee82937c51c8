"""What a run leaves to look at: a JSONL metrics log, a loss-curve PNG and image grids.

The plot is drawn with PIL (already a dependency) rather than matplotlib, which ldmkit does not need.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from ..errors import LDMKitError
from ..io import atomic_write_bytes, atomic_write_text


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return out

    def truncate_after(self, step: int) -> None:
        """On resume: drop what the killed run logged after the checkpoint it resumes from."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def plot_loss_curve(records: list[dict], path: Path, key: str = "loss", width: int = 720, height: int = 400) -> None:
    """A line plot of ``key`` against ``step`` (log scale when the loss spans more than a decade)."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    image = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(image)
    try:
        draw.font = PIL.ImageFont.load_default(size=13)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        pass  # older Pillow: the built-in bitmap font
    left, right, top, bottom = 70, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), f"{key} vs step", fill="black")
    if len(points) >= 2:
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        log = min(values) > 0 and max(values) / min(values) > 10
        ys = [math.log10(v) for v in values] if log else values
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        s0, s1 = min(steps), max(steps)
        s1 = s1 if s1 > s0 else s0 + 1

        def xy(step, y):
            return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

        draw.line([xy(s, y) for s, y in zip(steps, ys)], fill=(70, 110, 200), width=2)
        fmt = (lambda y: f"{10 ** y:.3g}") if log else (lambda y: f"{y:.3g}")
        draw.text((4, top - 6), fmt(hi), fill="black")
        draw.text((4, bottom - 6), fmt(lo), fill="black")
        draw.text((left, bottom + 8), str(s0), fill="black")
        draw.text((right - 40, bottom + 8), str(s1), fill="black")
        if log:
            draw.text((right - 90, 8), "log scale", fill="gray")
    save_png(image, path)


def save_png(image: PIL.Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def retrieval_ranks(generated: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each image's own target in ``gallery`` by pixel distance (1 = nearest).

    ``generated`` is (N, C, H, W), ``gallery`` (M, C, H, W) at the same size, ``targets`` (N,) gallery indices.
    The rank counts gallery images strictly nearer than the target, plus one, so a tie never helps.
    """
    if generated.shape[1:] != gallery.shape[1:]:
        raise LDMKitError(f"generated images {tuple(generated.shape[1:])} and gallery {tuple(gallery.shape[1:])} "
                          "differ in size; resize one to the other first.")
    distances = torch.cdist(generated.flatten(1).double(), gallery.flatten(1).double())  # (N, M)
    own = distances.gather(1, targets[:, None].long())
    return (distances < own).sum(1) + 1
