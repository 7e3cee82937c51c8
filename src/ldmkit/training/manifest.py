"""Checksums of a checkpoint: each checkpoint folder holds a ``SHA256SUMS`` manifest of its files.

The manifest has coreutils' ``sha256sum`` format, so ``cd checkpoints/step-00001000 && sha256sum -c SHA256SUMS``
checks a checkpoint by hand. It is written into the hidden ``.partial`` folder last, before the folder gets
its final name, so a checkpoint and its manifest appear together (huggingface_hub checks its downloads the
same way: by the SHA-256 of each file's content). A checkpoint whose bytes changed afterwards (a truncated
copy, a failing disk, bit rot) no longer matches; ``--resume latest`` then skips it for the previous one.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..io import atomic_write_text, sha256_file

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S.*)")


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every (visible) file in ``folder``."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith("."))
    atomic_write_text(Path(folder) / MANIFEST, "".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, str] | None:
    """file name -> hex digest; None if the manifest is unreadable (itself damaged)."""
    try:
        text = (Path(folder) / MANIFEST).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    entries = {}
    for line in text.splitlines():
        match = _LINE.fullmatch(line)
        if match is None or "/" in match.group(2):
            return None
        entries[match.group(2)] = match.group(1)
    return entries or None


def verify(folder: Path) -> str | None:
    """None when every file the manifest lists has its recorded checksum; otherwise what is wrong, for a
    message. (A folder without a manifest, written before checksums, is the caller's to decide.)"""
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        return f"its {MANIFEST} is unreadable"
    problems = []
    for name, digest in entries.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return "; ".join(problems) or None
