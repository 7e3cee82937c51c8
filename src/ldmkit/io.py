"""Atomic file writes: a reader never sees a half-written output or checkpoint.

Everything is written to a temporary file in the destination folder, flushed to disk, then renamed over
the destination (rename is atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LDMKitError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        write(tmp)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write(dest, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    atomic_write(dest, lambda p: p.write_bytes(data))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (weights and fonts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_json_object(text: str, where: str, fix: str) -> dict:
    """``text`` as a JSON object; otherwise an LDMKitError that says where the text came from and ``fix``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LDMKitError(f"{where} is not valid JSON ({e.msg}). {fix}") from None
    if not isinstance(data, dict):
        raise LDMKitError(f"{where} is not a JSON object (found {type(data).__name__}). {fix}")
    return data
