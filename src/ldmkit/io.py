"""Atomic file writes: a reader never sees a half-written output or checkpoint.

Everything is written to a temporary file in the destination folder, flushed to disk, then renamed over
the destination (rename is atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LDMKitError


class Terminated(BaseException):
    """SIGTERM, raised as an exception (by :func:`terminate_as_exception`) so that ``finally`` blocks and
    :func:`atomic_path` clean up, as they do for Ctrl-C's KeyboardInterrupt. Not an ``Exception``, so that no
    ``except Exception`` swallows it."""


def terminate_as_exception() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (the command line installs it; a library
    import changes no signal handler)."""
    def handler(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a temporary file is created and registered for removal: a signal in between
    would leave it behind. A held signal is delivered (its handler raises) as soon as the block ends."""
    hold = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        if hold:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only be read by
    setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed.

    The file gets the permissions a plain ``open(dest, "w")`` would (0644 under umask 022), not mkstemp's
    0600. "Error" includes Ctrl-C and, under the command line, SIGTERM (:func:`terminate_as_exception`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        with _signals_held():  # a signal is delivered at the end of this block, when the removal is registered
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            cleanup.callback(tmp_path.unlink, missing_ok=True)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, dest)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` (an existing one is set aside
    first and removed only after the move), on error (or a signal, as :func:`atomic_path`) it is removed.
    The folder gets the umask's permissions (0755 under umask 022), not mkdtemp's 0700."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
            cleanup.callback(_remove, tmp)
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        with _signals_held():  # between the two renames, a signal would leave no folder at dest
            old = None
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                dest.rename(old / dest.name)
            try:
                tmp.rename(dest)
            except OSError:
                if old is not None:
                    (old / dest.name).rename(dest)
                    old.rmdir()
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


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
