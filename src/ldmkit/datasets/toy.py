"""A generated toy dataset: solid-colour shapes on black with captions ("a red square"), for smoke tests,
the end-to-end test and the toy recipes: ``python -m ldmkit.datasets.toy data/toy-shapes``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 70, 230), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle")


def make_toy_dataset(folder: str | Path, size: int = 32, variants: int = 4, seed: int = 0) -> Path:
    """Write ``len(COLOURS) * len(SHAPES) * variants`` PNGs and their metadata.jsonl; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(variants):
                image = PIL.Image.new("RGB", (size, size), (0, 0, 0))
                draw = PIL.ImageDraw.Draw(image)
                extent = size * rng.uniform(0.6, 0.8)  # large shapes: the colour dominates the image
                cx, cy = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
                box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                name = f"{colour}_{shape}_{k}.png"
                image.save(folder / name)
                lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


if __name__ == "__main__":
    print(make_toy_dataset(sys.argv[1] if len(sys.argv) > 1 else "data/toy-shapes"))
