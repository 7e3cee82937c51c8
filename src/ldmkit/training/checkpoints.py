"""Checkpoints: written atomically, every N steps, the last K kept; ``--resume latest`` finds the newest.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00001000`` holding everything needed to continue
bit for bit: weights, EMA weights, optimizer and LR-scheduler states, the gradient scaler, every
process's RNG states and the data position (the step: the sampler's order is a function of it). It is
assembled in a hidden ``.partial`` folder and renamed into place only when complete, so a run killed at
any moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import LDMKitError
from ..io import atomic_path, atomic_write_text

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


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest complete checkpoint (or None, with a note);
    anything else is a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume latest: no checkpoint in %s yet; starting from step 0.",
                           Path(output_dir) / CHECKPOINTS)
            return None
        return found[-1][1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise LDMKitError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}). Pass 'latest' or a "
                          f"folder like {checkpoint_dir(output_dir, 1000)}.")
    return path


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
    torch.save) and ``state`` (JSON); every process writes its RNG states; then the folder is committed."""
    final = checkpoint_dir(output_dir, step)
    partial = final.parent / f".{final.name}.partial"
    if is_main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    barrier()
    partial.mkdir(parents=True, exist_ok=True)  # a node-local disk on non-shared file systems
    _save(partial / f"rng-rank{rank}.pt", rng_state())
    barrier()
    if is_main:
        for name, obj in payload.items():
            _save(partial / f"{name}.pt", obj)
        for name, text in (extra_text or {}).items():
            atomic_write_text(partial / name, text)
        atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        prune(output_dir, keep_last)
    barrier()
    return final


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


def prune(output_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partials(output_dir: Path) -> None:
    """Leftovers of a run killed while writing a checkpoint."""
    folder = Path(output_dir) / CHECKPOINTS
    if folder.is_dir():
        for path in folder.glob(".step-*.partial"):
            shutil.rmtree(path, ignore_errors=True)


def _save(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
