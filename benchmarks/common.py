"""What every benchmark here shares: a quiet-machine check, peak RSS, interleaved timing, result files.

The rules (README, "Measured numbers"): each library loads the same saved folder with its own
``from_pretrained``; one torch thread per process; the load average and the CPU's busy share are printed, and
results are written only when no other process was using a core. Run a benchmark from the repository root
as ``python benchmarks/NAME.py``: Python puts benchmarks/ on the path, so ``import common`` needs no hack.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUSY_LIMIT = 0.1  # share of all cores used by others above which results are not written


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Share of all cores that were busy over ``seconds`` (from /proc/stat), while this process sleeps."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def machine() -> dict:
    import torch

    return {"load_average": Path("/proc/loadavg").read_text().split()[:3], "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "processor": platform.processor()}


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` is the maximum above the start."""

    def __init__(self, interval=0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.base = self.rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def timed(fn, repeats: int):
    """(median seconds, last output) of ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interleaved(fn_a, fn_b, repeats: int):
    """Median seconds of a and b, alternating a, b, a, b... so background load hits both alike."""
    ta, tb = [], []
    out_a = out_b = None
    for _ in range(repeats):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            if fn is fn_a:
                out_a = out
            else:
                out_b = out
    return statistics.median(ta), out_a, statistics.median(tb), out_b


def run_worker(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``script --worker ARGS`` in a fresh one-thread process; its last stdout line is JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    out = subprocess.run([sys.executable, script, "--worker", *args], env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_result(name: str, result: dict, busy_before: float) -> bool:
    """Write results/NAME.json (atomically) unless another process used the CPU before or now."""
    from ldmkit.io import atomic_write_text

    busy = max(busy_before, cpu_busy_fraction())
    result = {**result, "machine": machine(), "cpu_busy_share": round(busy, 3)}
    if busy > BUSY_LIMIT:
        print(f"Another process was using the CPU ({busy:.0%} busy): {name}.json not written.")
        return False
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / (name + '.json')}")
    return True
