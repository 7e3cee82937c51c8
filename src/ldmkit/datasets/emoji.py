"""A captioned image dataset (``ldmkit data emoji``) made from the Noto Color Emoji font.

Every fully-qualified emoji of the Unicode list that the font draws as one glyph is rendered with Pillow,
cropped, centred on white at N x N and written in the Hugging Face *imagefolder* layout::

    DIR/train/metadata.jsonl   {"file_name": "1f34e.png", "text": "red apple"} per line
    DIR/train/1f34e.png ...
    DIR/test/...               the fixed held-out split
    DIR/manifest.json          font (path, version, sha256), counts, drops by reason, split rule

Where the emoji and their names come from: the ``emoji`` package (PyPI, ``pip install 'ldmkit[data]'``). Its
``EMOJI_DATA`` is generated from Unicode's emoji-test.txt, so it holds every emoji *sequence* (ZWJ, skin tones,
flags, keycaps) with its CLDR short name and qualification status, offline. ``unicodedata`` only names single
code points, and a font's GSUB table holds ligatures without names, so neither can caption sequences.
The emoji list is newer than most fonts: what the font cannot draw is found by rendering (see ``classify``).

The font: Debian/Ubuntu ``apt-get install fonts-noto-color-emoji`` (SIL Open Font License 1.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LDMKitError
from ..io import atomic_write, atomic_write_text, sha256_file
from .emoji_classes import add_labels, find_emoji_test

log = logging.getLogger(__name__)

# Where distributions put the font (Debian/Ubuntu, Fedora, Arch).
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
INSTALL_HINT = ("Install the Noto Color Emoji font: `apt-get install fonts-noto-color-emoji` (Debian/Ubuntu; "
                "Fedora: `dnf install google-noto-emoji-color-fonts`), or pass --font PATH to NotoColorEmoji.ttf.")
# CBDT bitmap fonts have one strike; FreeType loads Noto Color Emoji at this pixel size only.
BITMAP_SIZE = 109
# VS16 is not in the font's cmap: the shaper drops it (default-ignorable), so it is not a missing character.
IGNORABLE = {0xFE0F}
SKIN_TONES = ("light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone",
              "dark skin tone")
DEFAULT_TEST_FRACTION = 0.05
NEAR_WHITE = 250  # a render whose every channel is at least this is blank (nothing visible on white)


@dataclass(frozen=True)
class Emoji:
    text: str
    caption: str

    @property
    def file_name(self) -> str:
        # Code points in hex, like the font's own sources (emoji_u1f34e.png): stable across builds and limits.
        return "-".join(f"{ord(c):x}" for c in self.text if ord(c) not in IGNORABLE) + ".png"


@dataclass
class BuildReport:
    train: int = 0
    test: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    labels: dict | None = None

    def drop(self, reason: str, caption: str) -> None:
        self.dropped.setdefault(reason, []).append(caption)


# ------------------------------------------------------------------------------------------ emoji + captions
def caption_of(cldr: str, text: str) -> str:
    """':woman_juggling_medium_skin_tone:' -> 'woman juggling medium skin tone'; flags get CLDR's 'flag' word."""
    words = cldr.strip(":").replace("_", " ").replace("’", "'").lower()
    # The emoji package drops CLDR's "flag:" prefix (':United_States:'): put it back so a caption says what it shows.
    if is_flag(text) and not words.startswith("flag"):
        words = "flag " + words
    return " ".join(words.split())


def is_flag(text: str) -> bool:
    """A pair of regional indicators (country flags) or a black flag with tag characters (England, ...)."""
    cps = [ord(c) for c in text]
    regional = all(0x1F1E6 <= c <= 0x1F1FF for c in cps) and len(cps) == 2
    tagged = len(cps) > 2 and cps[0] == 0x1F3F4 and all(0xE0020 <= c <= 0xE007F for c in cps[1:])
    return regional or tagged


def emoji_list() -> list[Emoji]:
    """Every fully-qualified emoji with its caption, sorted by code points (a stable order for --limit)."""
    try:
        import emoji
    except ModuleNotFoundError as e:
        raise LDMKitError("The emoji dataset needs the `emoji` package: pip install 'ldmkit[data]'.") from e
    qualified = emoji.STATUS["fully_qualified"]
    items = [Emoji(t, caption_of(d["en"], t)) for t, d in emoji.EMOJI_DATA.items() if d["status"] == qualified]
    return sorted(items, key=lambda e: [ord(c) for c in e.text])


def split_key(caption: str) -> str:
    """The caption without skin tones: all tones of one emoji share a split, so a held-out emoji is unseen."""
    for tone in SKIN_TONES:
        caption = caption.replace(tone, "")
    return " ".join(caption.replace(",", " ").split())


def is_test(caption: str, fraction: float) -> bool:
    """Deterministic and independent of the other emoji (a hash, not a shuffle): adding emoji moves none."""
    digest = hashlib.sha256(split_key(caption).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------------- font
def find_font(path: str | None = None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise LDMKitError(f"No font file at {path}. {INSTALL_HINT}")
        return Path(path)
    for candidate in (*FONT_CANDIDATES, *_fontconfig_paths()):
        if Path(candidate).is_file():
            return Path(candidate)
    raise LDMKitError(f"Noto Color Emoji is not installed. {INSTALL_HINT}")


def _fontconfig_paths() -> list[str]:
    """Where fontconfig knows the font to be (other distributions, ~/.fonts); [] without fontconfig."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    try:
        found = subprocess.run([fc_list, ":family=Noto Color Emoji", "file"], capture_output=True, text=True,
                               timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # Only the CBDT build: the COLRv1 one (Noto-COLRv1.ttf) cannot be drawn by Pillow.
    paths = (line.split(":")[0].strip() for line in found.splitlines())
    return sorted(p for p in paths if Path(p).name == "NotoColorEmoji.ttf")


@dataclass
class EmojiFont:
    """The font as Pillow draws it, plus its cmap (to tell a missing character from a drawn one)."""

    path: Path
    font: object
    cmap: set[int]
    advance: float
    version: str
    license: str

    @classmethod
    def load(cls, path: Path) -> EmojiFont:
        from PIL import ImageFont, features

        # Without raqm Pillow does no shaping, so every ZWJ sequence, flag and keycap would split into pieces.
        if not features.check("raqm"):
            raise LDMKitError("Pillow was built without raqm (text shaping), which emoji sequences need: install "
                              "Pillow's wheel from PyPI (pip install --force-reinstall pillow) or libraqm.")
        try:
            font = ImageFont.truetype(str(path), BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
        except OSError as e:
            raise LDMKitError(f"Pillow cannot load {path} at {BITMAP_SIZE} px ({e}); it must be the CBDT bitmap "
                              f"NotoColorEmoji.ttf, not the COLRv1 or SVG build. {INSTALL_HINT}") from e
        cmap, version, license_ = _font_tables(path)
        return cls(path, font, cmap, font.getlength("\U0001f600"), version, license_)

    def glyph_count(self, text: str) -> int:
        # Every Noto Color Emoji glyph has the same advance and ZWJ/VS16 have none, so the advance of a shaped
        # string counts its glyphs: 1 when the font has a ligature for the sequence, more when it falls apart.
        return round(self.font.getlength(text) / self.advance)

    def missing(self, text: str) -> bool:
        return any(ord(c) not in self.cmap and ord(c) not in IGNORABLE for c in text)


def _font_tables(path: Path) -> tuple[set[int], str, str]:
    try:
        from fontTools.ttLib import TTFont
    except ModuleNotFoundError as e:
        raise LDMKitError("The emoji dataset needs fontTools: pip install 'ldmkit[data]'.") from e
    with TTFont(str(path), lazy=True) as tt:
        names = tt["name"]
        version = names.getDebugName(5) or str(tt["head"].fontRevision)
        return set(tt.getBestCmap()), version, names.getDebugName(13) or "unknown"


# --------------------------------------------------------------------------------------------------- render
def render(font: EmojiFont, text: str, size: int):
    """The emoji cropped to its ink, on white, fitted into size x size (aspect kept, centred); None if blank."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.font.getbbox(text)
    canvas = Image.new("RGBA", (max(right, 1) + 2, max(bottom, 1) + 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font.font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    # Composite before resizing: resampling straight RGBA would pull colour from the transparent (black) pixels.
    white = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, glyph).convert("RGB")
    if min(low for low, _ in flat.getextrema()) >= NEAR_WHITE:
        return None
    return fit(flat, size)


def fit(image, size: int):
    from PIL import Image

    scale = size / max(image.size)
    w, h = (max(1, round(d * scale)) for d in image.size)
    small = image.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(small, ((size - w) // 2, (size - h) // 2))
    return out


def classify(font: EmojiFont, item: Emoji, size: int, seen: set[str]):
    """(image, None) for a keeper, (None, reason) for a drop. Cheap checks first: a render costs the most."""
    if item.caption in seen:
        return None, "duplicate_caption"
    if font.missing(item.text):
        return None, "not_in_font"
    glyphs = font.glyph_count(item.text)
    if glyphs > 1:
        return None, "multi_glyph"
    image = render(font, item.text, size) if glyphs == 1 else None
    return (image, None) if image is not None else (None, "blank")


# ---------------------------------------------------------------------------------------------------- build
def prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty DIR unless --force; then only this builder's outputs are deleted."""
    if out.exists() and not out.is_dir():
        raise LDMKitError(f"--out {out} is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise LDMKitError(f"{out} is not empty: pass --force to replace the dataset in it, or pick a new --out.")
        for split in ("train", "test"):
            shutil.rmtree(out / split, ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def save_png(image, dest: Path) -> None:
    atomic_write(dest, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def write_metadata(folder: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(folder / "metadata.jsonl", text)


def iter_kept(font: EmojiFont, items: Iterable[Emoji], size: int, report: BuildReport) -> Iterator[tuple]:
    seen: set[str] = set()
    for item in items:
        image, reason = classify(font, item, size, seen)
        seen.add(item.caption)
        if reason is not None:
            report.drop(reason, item.caption)
            continue
        yield item, image


def build_emoji_dataset(out: str | Path, size: int = 32, font_path: str | None = None, force: bool = False,
                        test_fraction: float = DEFAULT_TEST_FRACTION, limit: int | None = None,
                        items: Iterable[Emoji] | None = None, labels: bool | None = None,
                        emoji_test: str | None = None) -> BuildReport:
    """Render the emoji (``items``, default: all of the ``emoji`` package; the first ``limit`` of them) into
    ``out``. Images and metadata files are written atomically, the manifest last: a folder without
    ``manifest.json`` is an interrupted build. With ``labels`` the class labels (Unicode subgroups, see
    emoji_classes.py; needs emoji-test.txt) are then added as the ``label`` column; None: when
    emoji-test.txt is found (``emoji_test`` or unicode-data's), else with a warning."""
    if labels or emoji_test is not None:
        find_emoji_test(emoji_test)  # fail before rendering, not after
        labels = True
    elif labels is None:
        try:
            find_emoji_test()
            labels = True
        except LDMKitError as e:
            log.warning("No class labels (the 'label' column): %s", e)
            labels = False
    if size < 1:
        raise LDMKitError(f"--size must be a positive number of pixels, not {size}.")
    if not 0.0 <= test_fraction < 1.0:
        raise LDMKitError(f"--test-fraction must be in [0, 1), not {test_fraction}.")
    font = EmojiFont.load(find_font(font_path))
    items = list(emoji_list() if items is None else items)[:limit]
    out = Path(out)
    prepare_out(out, force)
    start, report = time.perf_counter(), BuildReport()
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for item, image in iter_kept(font, items, size, report):
        split = "test" if is_test(item.caption, test_fraction) else "train"
        save_png(image, out / split / item.file_name)
        rows[split].append({"file_name": item.file_name, "text": item.caption})
    for split, split_rows in rows.items():
        (out / split).mkdir(exist_ok=True)
        write_metadata(out / split, split_rows)
    report.train, report.test = len(rows["train"]), len(rows["test"])
    report.seconds = time.perf_counter() - start
    write_manifest(out, font, size, test_fraction, len(items), report)
    if labels and report.train:
        report.labels = add_labels(out, emoji_test)
    return report


def write_manifest(out: Path, font: EmojiFont, size: int, test_fraction: float, candidates: int,
                   report: BuildReport) -> None:
    from PIL import __version__ as pillow_version

    try:
        from emoji import __version__ as emoji_version
    except ModuleNotFoundError:
        emoji_version = None
    manifest = {
        "builder": "ldmkit data emoji",
        "layout": "imagefolder (train/, test/, metadata.jsonl with file_name and text)",
        "font": {"path": str(font.path), "version": font.version, "sha256": sha256_file(font.path),
                 "license": font.license},
        "emoji_package": emoji_version,
        "pillow": pillow_version,
        "size": size,
        "candidates": candidates,
        "count": {"train": report.train, "test": report.test, "total": report.train + report.test},
        "dropped": {reason: len(captions) for reason, captions in sorted(report.dropped.items())},
        "dropped_captions": dict(sorted(report.dropped.items())),
        "split": {"test_fraction": test_fraction,
                  "rule": "test if int(sha256(caption without skin tones).digest()[:8]) / 2**64 < test_fraction"},
        "render": f"Pillow at {BITMAP_SIZE} px (embedded colour), cropped to ink, on white, Lanczos to fit, centred",
        "seconds": round(report.seconds, 2),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


__all__ = ["Emoji", "build_emoji_dataset", "caption_of", "emoji_list", "is_test"]
