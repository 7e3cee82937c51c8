"""Checkpoints: written atomically, every N steps, the last K kept; ``--resume latest`` finds the newest.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00001000`` holding everything needed to continue
bit for bit: weights, EMA weights, optimizer and LR-scheduler states, the gradient scaler, every
process's RNG states and the data position (the step: the sampler's order is a function of it), the recipe,
and a ``SHA256SUMS`` manifest of its files (manifest.py). It is assembled in a hidden ``.partial`` folder and
renamed into place only when complete, so a run killed at any moment leaves either the whole checkpoint or
none of it; a checkpoint saved again replaces the old one only once the new one is complete, and keep_last
deletes old ones only after that. A damaged checkpoint (its checksums no longer match) is skipped by
``--resume latest`` for the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import LDMKitError
from ..io import Terminated, atomic_path, atomic_write_text
from . import faults, manifest

logger = logging.getLogger("ldmkit.training")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"step-(\d{8})")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a folder only gets its final name once complete)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None) -> tuple[Path | None, list[Path]]:
    """``(checkpoint to resume from, damaged newer checkpoints skipped)``. ``None`` -> no resume; ``"latest"``
    -> the newest complete checkpoint whose files match their checksums (or None, with a note, if there is
    none yet); anything else is a checkpoint folder, which must be intact."""
    if resume is None:
        found = list_checkpoints(output_dir)
        if found:  # a fresh run here would mix its checkpoints with the old run's: --resume latest would pick theirs
            raise LDMKitError(f"{output_dir} already holds checkpoints of a run (newest: {found[-1][1].name}). "
                              "Continue that run with --resume latest, or start a new one in another output_dir "
                              f"(or delete {Path(output_dir) / CHECKPOINTS} first).")
        return None, []
    if resume == "latest":
        return _latest_intact(output_dir)
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise LDMKitError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}). Pass 'latest' or a "
                          f"folder like {checkpoint_dir(output_dir, 1000)}.")
    problem = _damage(path)
    if problem:
        raise LDMKitError(f"--resume {resume}: the checkpoint is damaged ({problem}). Resume from another one, e.g. "
                          "--resume latest (the newest intact checkpoint).")
    return path, []


def _latest_intact(output_dir: Path) -> tuple[Path | None, list[Path]]:
    found = list_checkpoints(output_dir)
    if not found:
        logger.warning("--resume latest: no checkpoint in %s yet; starting from step 0.",
                       Path(output_dir) / CHECKPOINTS)
        return None, []
    damaged = []
    for _, path in reversed(found):
        problem = _damage(path)
        if problem is None:
            if damaged:
                logger.warning("Resuming from %s, the newest intact checkpoint.", path)
            return path, damaged
        logger.warning("Checkpoint %s is damaged (%s): skipping it for the one before.", path, problem)
        damaged.append(path)
    raise LDMKitError(f"--resume latest: every checkpoint in {Path(output_dir) / CHECKPOINTS} is damaged (see the "
                      "warnings above). Restore one from a backup, or start again without --resume.")


def _damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (None if it is intact or predates checksums)."""
    if not manifest.has_manifest(path):
        logger.warning("Checkpoint %s has no %s (written before checksums): it cannot be verified.", path,
                       manifest.MANIFEST)
        return None
    return manifest.verify(path)


def set_aside_damaged(paths: list[Path]) -> None:
    """Rename damaged checkpoints to ``step-N.damaged``: kept for inspection, but no longer listed, resumed
    from or counted by keep_last (which would otherwise delete good checkpoints to keep them)."""
    for path in paths:
        target = path.with_name(f"{path.name}.damaged")
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        logger.warning("Moved the damaged checkpoint %s to %s.", path, target)


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


# ------------------------------------------------------------------------------------------ save / load


def save_checkpoint(output_dir: Path, step: int, payload: dict[str, object], state: dict, *, rank: int,
                    is_main: bool, barrier: Callable[[], None], keep_last: int, extra_text: dict | None = None
                    ) -> Path:
    """Collective: every process calls it. The main process writes ``payload`` (name -> object for
    torch.save) and ``state`` (JSON); every process writes its RNG states; then the main process writes the
    checksums, commits the folder and prunes. A failure (a full disk, a signal) removes the partial folder and
    leaves every earlier checkpoint as it was."""
    final = checkpoint_dir(output_dir, step)
    partial = final.parent / f".{final.name}.partial"
    previous = list_checkpoints(output_dir)
    needed = faults.folder_size(previous[-1][1]) if previous else None
    intact = (f"The previous checkpoint {previous[-1][1]} is intact." if previous else
              "No checkpoint was written yet.")
    with faults.disk_errors(f"checkpoint {final}", final.parent, needed, intact, any_error=True), \
            faults.removed_on_error(partial, enabled=is_main):
        if is_main:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        barrier()
        partial.mkdir(parents=True, exist_ok=True)  # a node-local disk on non-shared file systems
        _save(partial / f"rng-rank{rank}.pt", rng_state())
        barrier()
        if is_main:
            _write_main(partial, payload, state, extra_text or {})
            faults.commit_folder(partial, final)
            _fsync_dir(final.parent)
            prune(output_dir, keep_last, step)
    barrier()
    return final


def _write_main(partial: Path, payload: dict, state: dict, extra_text: dict) -> None:
    for name, obj in payload.items():
        _save(partial / f"{name}.pt", obj)
    for name, text in extra_text.items():
        atomic_write_text(partial / name, text)
        _test_pause()
    atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    manifest.write_manifest(partial)
    _test_pause()


def _test_pause() -> None:
    """Test hook: LDMKIT_TEST_CHECKPOINT_DELAY=SECONDS sleeps after each file of a checkpoint, so that a test's
    SIGKILL can land in the middle of a checkpoint write (tests/test_training_kills.py)."""
    delay = os.environ.get("LDMKIT_TEST_CHECKPOINT_DELAY")
    if delay:
        time.sleep(float(delay))


def load_checkpoint(path: Path, names: list[str], rank: int) -> tuple[dict, dict, dict | None]:
    """``(payload by name, trainer state, this process's RNG state or None)``."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    payload = {}
    for name in names:
        file = path / f"{name}.pt"
        if not file.is_file():
            raise LDMKitError(f"Checkpoint {path} has no {file.name}: it was written by another kind of run.")
        payload[name] = torch.load(file, map_location="cpu", weights_only=True)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return payload, state, rng


def prune(output_dir: Path, keep_last: int, step: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step``, just saved and complete. Newer ones (left by
    a run resumed from an older checkpoint) are not counted, so they never push the new one out."""
    done = [path for s, path in list_checkpoints(output_dir) if s <= step]
    for path in done[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partials(output_dir: Path) -> None:
    """Tidy what a run killed while writing a checkpoint left: partial folders are removed, and a checkpoint
    set aside to be replaced (:func:`faults.commit_folder`) is put back if its replacement never arrived."""
    # A SIGKILL mid-write leaves atomic_path's / atomic_folder's temporary (".loss.png.x1y2.tmp") behind:
    # nothing else writes in a run's folder, so any left when a run starts is garbage.
    for path in sorted(Path(output_dir).rglob(".*.tmp"), reverse=True) if Path(output_dir).is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    folder = Path(output_dir) / CHECKPOINTS
    if folder.is_dir():
        for path in folder.glob(".step-*.partial"):
            shutil.rmtree(path, ignore_errors=True)
        for path in folder.glob(".step-*.old"):
            faults.recover_folder(path.with_name(path.name[1:-len(".old")]))


def _save(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            _torch_save(obj, f)
    _test_pause()


def _torch_save(obj, f) -> None:
    """torch.save into a Python file object, so that a failed write is the OSError (ENOSPC, ...) that says
    why: to a path, torch writes with C++ streams and reports a full disk as "unexpected pos"; to a file
    object, its zip writer still raises that RuntimeError while unwinding, with the OSError as its context.
    The same unwinding error would hide a second Ctrl-C or SIGTERM raised mid-write (exit status 1 instead
    of 130 / 143), so a KeyboardInterrupt or Terminated found in the context is re-raised too."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt, Terminated)):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable (POSIX); not possible (nor needed) on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
