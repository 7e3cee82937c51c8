"""Peak memory of a block of torch code on any device, CPU included (which keeps no allocator statistics):
every storage that an operator creates counts from its creation until it is freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as probe: ...`` then ``probe.peak`` (bytes) and ``probe.largest`` (the largest one
    tensor's bytes). Tensors that existed before the block (weights, inputs) do not count."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage, inputs: set[int]) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._tracked or key in inputs or size == 0:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, size)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


# ----------------------------------------------------------------------------------------- resident set size
# What PeakMemory cannot see: memory-mapped file pages and allocations made outside torch's operators (a
# safetensors mapping, malloc arenas). Linux only: /proc/self/status and clear_refs.
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def rss_status() -> dict[str, int]:
    """This process's resident set now (VmRSS), its peak since the last :func:`reset_peak_rss` (VmHWM), and
    the anonymous / file-backed parts of VmRSS, in bytes."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(STATUS_FIELDS)}


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (writing 5 to clear_refs, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def can_measure_rss() -> bool:
    try:
        reset_peak_rss()
        return rss_status()["VmHWM"] > 0
    except (OSError, KeyError):
        return False


def run_probe(code: str, *args: str, timeout: float = 120) -> dict:
    """Run ``code`` (a script whose last stdout line is JSON) in a fresh one-thread Python process, with
    ldmkit's src and tests/ on the path, so the peak RSS it measures is its own; ``args`` are its sys.argv[1:]."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parent / "src"), str(here), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
