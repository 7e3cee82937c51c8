"""What a training run does when the world interferes: a signal, a full disk, a kill in the middle of a write.

* **SIGINT / SIGTERM** (Ctrl-C, ``kill``, a cluster's pre-emption notice) during the loop do not interrupt
  the step under way: :class:`StopSignals` notes the signal, the loop finishes the step, writes a checkpoint
  and raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) or :class:`TrainingTerminated` (an
  :class:`~ldmkit.io.Terminated`). ``ldmkit train`` turns them into one line on stderr and exit status 130 /
  143, as the shell reports a process killed by those signals. A second signal stops at once (the atomic
  writes still remove their temporary files).
* **A full disk** (ENOSPC, or EDQUOT: over quota) is an :class:`~ldmkit.errors.LDMKitError` that says where,
  how much room there is and what to do, instead of torch's ``unexpected pos`` from deep in its zip writer.
* **Folders are committed, never deleted first**: :func:`commit_folder` moves a finished folder into place
  and only then removes the one it replaces, so a kill at any moment leaves a complete copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import LDMKitError
from ..io import Terminated

# ---------------------------------------------------------------------------------------------- signals


class _Stopped:
    """Mixed into the two exceptions the loop raises once it has saved after a signal."""

    exit_code: int = 1
    step: int
    checkpoint: Path | None

    def _describe(self, what: str) -> str:
        where = f"; checkpoint {self.checkpoint}" if self.checkpoint is not None else ""
        return (f"{what} at step {self.step}{where}. Continue the run with the same command and "
                "--resume latest.")


class TrainingInterrupted(_Stopped, KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped training between two steps, after a checkpoint was written."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(self._describe("interrupted (SIGINT)"))


class TrainingTerminated(_Stopped, Terminated):
    """SIGTERM stopped training between two steps, after a checkpoint was written."""

    exit_code = 143

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(self._describe("terminated (SIGTERM)"))


def _raise_now(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM only set :attr:`signum`; the loop asks
    :meth:`requested` at each step boundary. A second signal raises at once. Only the main thread can hold
    signal handlers, so elsewhere (a training call from a worker thread) signals keep their handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}
        self._group = None

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            _raise_now(signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        # Installed before the data loader's workers are forked, which inherit the handler: a Ctrl-C that reaches
        # the whole process group then does not kill a worker (and with it the step being finished).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            # The per-step flag goes over a CPU (gloo) group: on the GPUs' NCCL group, reading it back would
            # wait for the GPU at every step, and the CPU could no longer queue the next step ahead.
            self._group = dist.new_group(backend="gloo")  # collective: every process enters here
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, world_size: int) -> bool:
        """Whether any process got a signal (a collective when there are several: all must stop at the same
        step, or the next checkpoint's barriers would wait forever)."""
        if world_size == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if self.signum is None and flag.item():
            self.signum = int(flag.item())
        return self.signum is not None

    def stop(self, step: int, checkpoint: Path | None) -> None:
        """Raise the exception for the signal received."""
        if self.signum == signal.SIGINT:
            raise TrainingInterrupted(step, checkpoint)
        raise TrainingTerminated(step, checkpoint)


# ------------------------------------------------------------------------------------------- full disks

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _free_space(folder: Path) -> str:
    for path in (folder, *folder.parents):
        if path.exists():
            return f"{shutil.disk_usage(path).free / 1e6:.1f} MB"
    return "unknown"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@contextlib.contextmanager
def disk_errors(what: str, folder: Path, needed: int | None = None, intact: str | None = None,
                any_error: bool = False) -> Iterator[None]:
    """Turn a full disk (or, with ``any_error``, any OSError but a missing path) while writing ``what`` into
    ``folder`` into an LDMKitError that names the cause and the fix. ``needed`` (bytes) is how much the write
    takes, ``intact`` what is still safe."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL and (not any_error or isinstance(e, FileNotFoundError | NotADirectoryError)):
            raise
        folder = Path(e.filename).parent if isinstance(e.filename, str) else Path(folder)  # where it failed
        need = f"; it needs about {needed / 1e6:.1f} MB" if needed else ""
        kept = f" {intact}" if intact else ""
        if e.errno in DISK_FULL:
            cause = "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is exceeded"
            raise LDMKitError(
                f"Could not write {what}: {cause} ({_free_space(folder)} free in {folder}{need}).{kept} Free some "
                "space there, or move the run's output folder to a disk with room and pass it as --output-dir "
                "(output_dir); then continue with --resume latest.") from None
        raise LDMKitError(f"Could not write {what} in {folder}: {e.strerror or e}.{kept} Check that the folder is "
                          "writable, or set --output-dir (output_dir) to one that is; then continue with "
                          "--resume latest.") from None


# ----------------------------------------------------------------------------------------------- folders


def commit_folder(partial: Path, final: Path) -> None:
    """Move the complete folder ``partial`` to ``final``. An existing ``final`` is first renamed to a hidden
    ``.NAME.old`` and removed only once the new one is in place: at every moment one complete copy exists
    (:func:`recover_folder` puts the old one back if a kill lands between the two renames)."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> None:
    """After a kill: if ``final`` is missing but its set-aside ``.NAME.old`` copy is there, restore it; an
    ``.old`` copy beside a present ``final`` is a leftover."""
    old = final.parent / f".{final.name}.old"
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


@contextlib.contextmanager
def removed_on_error(path: Path, enabled: bool = True) -> Iterator[None]:
    """Remove the folder ``path`` if the block fails, including on a signal's KeyboardInterrupt / Terminated."""
    try:
        yield
    except BaseException:
        if enabled:
            shutil.rmtree(path, ignore_errors=True)
        raise
