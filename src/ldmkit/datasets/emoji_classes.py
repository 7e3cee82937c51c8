"""Class labels for the emoji dataset: Unicode's emoji groups and subgroups (``emoji-test.txt``).

The source: Unicode's ``emoji-test.txt``, which Debian/Ubuntu ship in the ``unicode-data`` package
(``apt-get install unicode-data``: /usr/share/unicode/emoji/emoji-test.txt, Emoji 15.0 in Debian 12). Every
emoji line sits under a ``# group:`` and a ``# subgroup:`` header (e.g. "Animals & Nature" / "animal-mammal").

Emoji newer than the file (Emoji 15.1 in the font but not in Debian's 15.0 list: phoenix, lime, head shaking,
the facing-right people, ...) take the class of their base: the sequence without skin tones and VS16, then its
first ZWJ part (phoenix = bird + ZWJ + fire -> "animal-bird"). What has no base in the file goes to "other".

The classes (see docs/emoji-classes.md): a subgroup with at least ``min_images`` training images is a class
named as the subgroup; the emoji of smaller subgroups are pooled per group into "<group>-other" (e.g.
"animals-nature-other"); a pool still smaller than ``min_images`` goes to "other". Counts are taken on the
training split and the test split maps through the same table.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..errors import LDMKitError
from ..io import atomic_write_text

EMOJI_TEST_CANDIDATES = ("/usr/share/unicode/emoji/emoji-test.txt", "/usr/share/unicode-data/emoji/emoji-test.txt")
INSTALL_HINT = ("Install Unicode's emoji-test.txt: `apt-get install unicode-data` (Debian/Ubuntu), or pass the "
                "file's path (https://unicode.org/Public/emoji/latest/emoji-test.txt).")
DEFAULT_MIN_IMAGES = 20
OTHER = "other"
ZWJ, VS16 = 0x200D, 0xFE0F
SKIN_TONE_RANGE = range(0x1F3FB, 0x1F400)
_LINE = re.compile(r"^([0-9A-Fa-f ]+);\s*([a-z-]+)")


def find_emoji_test(path: str | Path | None = None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise LDMKitError(f"No emoji-test.txt at {path}. {INSTALL_HINT}")
        return Path(path)
    for candidate in EMOJI_TEST_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise LDMKitError(f"Unicode's emoji-test.txt is not installed. {INSTALL_HINT}")


def read_emoji_test(path: str | Path | None = None) -> tuple[dict[tuple[int, ...], tuple[str, str]], str]:
    """``{code points: (group, subgroup)}`` for every line of emoji-test.txt (all qualification statuses),
    and the file's ``# Version:``."""
    table: dict[tuple[int, ...], tuple[str, str]] = {}
    group = subgroup = version = ""
    for line in find_emoji_test(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.startswith("# Version:"):
            version = line.split(":", 1)[1].strip()
        elif (match := _LINE.match(line)) and group:
            table[tuple(int(cp, 16) for cp in match.group(1).split())] = (group, subgroup)
    if not table:
        raise LDMKitError(f"{path} has no emoji lines: is it Unicode's emoji-test.txt? {INSTALL_HINT}")
    return table, version


def code_points(file_name: str) -> tuple[int, ...]:
    """'1f469-200d-1f4bb.png' -> (0x1F469, 0x200D, 0x1F4BB): the dataset's file names are the code points."""
    stem = Path(file_name).stem
    try:
        return tuple(int(part, 16) for part in stem.split("-"))
    except ValueError:
        raise LDMKitError(f"{file_name} is not an emoji file name (hex code points joined by '-').") from None


def lookup(cps: tuple[int, ...], table: dict) -> tuple[str, str] | None:
    """(group, subgroup) of a sequence; for one the file lacks, of its base (see the module note)."""
    plain = tuple(c for c in cps if c != VS16)
    untoned = tuple(c for c in plain if c not in SKIN_TONE_RANGE)
    first = untoned[: untoned.index(ZWJ)] if ZWJ in untoned else untoned
    for key in (cps, plain, untoned, first):
        for candidate in (key, (*key, VS16)):
            if candidate in table:
                return table[candidate]
    return None


def slug(group: str) -> str:
    """'Animals & Nature' -> 'animals-nature' (the style of Unicode's subgroup names)."""
    return "-".join(re.findall(r"[a-z0-9]+", group.lower()))


def class_table(train_files: list[str], table: dict, min_images: int = DEFAULT_MIN_IMAGES):
    """``classify(file_name) -> class name``, built from the training files' subgroup counts."""
    per_subgroup = Counter(lookup(code_points(f), table) for f in train_files)
    pooled = Counter()
    for key, n in per_subgroup.items():
        if key is not None and n < min_images:
            pooled[slug(key[0]) + "-other"] += n

    def classify(file_name: str) -> str:
        key = lookup(code_points(file_name), table)
        if key is None:
            return OTHER
        if per_subgroup.get(key, 0) >= min_images:
            return key[1]
        pool = slug(key[0]) + "-other"
        return pool if pooled[pool] >= min_images else OTHER

    return classify


def label_files(train_files: list[str], test_files: list[str], path: str | Path | None = None,
                min_images: int = DEFAULT_MIN_IMAGES) -> tuple[dict[str, str], dict[str, str], dict]:
    """Class names for the train and test files, and a summary (source, version, counts) for the manifest."""
    table, version = read_emoji_test(path)
    classify = class_table(train_files, table, min_images)
    train = {f: classify(f) for f in train_files}
    test = {f: classify(f) for f in test_files}
    fallback = sum(1 for f in [*train_files, *test_files] if code_points(f) not in table
                   and (*code_points(f), VS16) not in table)
    summary = {"source": str(find_emoji_test(path)), "emoji_version": version, "min_images": min_images,
               "column": "label", "not_in_file": fallback,
               "classes": dict(sorted(Counter(train.values()).items())),
               "test_classes": dict(sorted(Counter(test.values()).items()))}
    return train, test, summary


def add_labels(folder: str | Path, path: str | Path | None = None, min_images: int = DEFAULT_MIN_IMAGES) -> dict:
    """Add the ``label`` column to an emoji dataset's train/ and test/ metadata.jsonl (each file replaced
    atomically; images untouched) and the summary to manifest.json. Returns the summary."""
    folder = Path(folder)
    rows = {}
    for split in ("train", "test"):
        meta = folder / split / "metadata.jsonl"
        if not meta.is_file():
            raise LDMKitError(f"{meta} is missing: {folder} is not an emoji dataset. Build one with "
                              "`ldmkit data emoji --out DIR`.")
        rows[split] = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, test, summary = label_files([r["file_name"] for r in rows["train"]],
                                       [r["file_name"] for r in rows["test"]], path, min_images)
    for split, names in (("train", train), ("test", test)):
        text = "".join(json.dumps({**r, "label": names[r["file_name"]]}, ensure_ascii=False) + "\n"
                       for r in rows[split])
        atomic_write_text(folder / split / "metadata.jsonl", text)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        data["labels"] = summary
        atomic_write_text(manifest, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return summary


__all__ = ["add_labels", "class_table", "code_points", "find_emoji_test", "label_files", "lookup", "read_emoji_test",
           "slug"]
