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
import tempfile
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


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (what ``dtype="auto"`` looks for): timings of one
    machine do not carry over to another (an AMD EPYC here ran diffusers' fp32 call 1.6x slower than the
    earlier Intel machine, and bf16 gained less)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in info]
    return " ".join([name or platform.processor(), *flags])


def machine() -> dict:
    import torch

    return {"load_average": Path("/proc/loadavg").read_text().split()[:3], "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "processor": cpu_model()}


class PeakRSS:
    """``peak``: the maximum of this process's resident set size above its size at the start of the block.
    Exact on Linux (the kernel's VmHWM, reset by clear_refs at the start); elsewhere sampled by a thread."""

    def __init__(self, interval=0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def high_water() -> int | None:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
            self.exact = True
        except OSError:
            self.exact = False
        self.base = self.rss()
        if not self.exact:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = max(0, self.high_water() - self.base)
            return
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def own_peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_rss_of_process(proc: subprocess.Popen) -> tuple[str, int]:
    """(its stdout, its peak resident set in bytes) of a child started with ``stdout=PIPE``, once it exits
    (``proc.returncode`` is set). Linux keeps the high-water mark across fork and exec, so a child's figure is
    at least its parent's peak: refuse when that floor is not small against what is measured."""
    if own_peak_rss() > 2**30:
        raise SystemExit(f"this process peaked at {own_peak_rss() / 2**30:.2f} GiB, which its children's peak RSS "
                         "would inherit: load models in child processes only")
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, usage.ru_maxrss * 1024  # Linux reports kilobytes


def _drop_times(tree, keys: tuple[str, ...]):
    if isinstance(tree, dict):
        return {k: None if k in keys else _drop_times(v, keys) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_drop_times(v, keys) for v in tree]
    return tree


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


def worker_env(env: dict | None = None) -> dict:
    """The environment of a worker process: one thread, offline."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))


def run_worker(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``script --worker ARGS`` in a fresh one-thread process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, script, "--worker", *args], env=worker_env(env), capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"worker {script} {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def announce() -> float:
    """Print the load average and the share of the CPU that other processes use now; return that share (pass
    it to :func:`write_result`, which checks again at the end)."""
    busy = cpu_busy_fraction()
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}, CPU busy {busy:.0%} "
          f"({os.cpu_count()} cores; results are written only below {BUSY_LIMIT:.0%})", flush=True)
    return busy


def write_result(name: str | os.PathLike, result: dict, busy_before: float, timing_keys: tuple[str, ...] = ()) -> bool:
    """Write results/NAME.json (or the path NAME, atomically) unless another process used the CPU before or
    now. Refused, the result goes to a ``.busy.json`` file in the temporary folder instead, so that a long
    run is not lost; it is not a result (its times measure the other processes too).

    ``timing_keys``: a quality benchmark whose times are a side note names them; a busy run is then written
    with those keys (at any depth) set to None, since the quality does not depend on the load."""
    from ldmkit.io import atomic_write_text

    path = Path(name) if str(name).endswith(".json") else RESULTS / f"{name}.json"
    busy = max(busy_before, cpu_busy_fraction())
    result = {**result, "machine": machine(), "cpu_busy_share": round(busy, 3)}
    if busy > BUSY_LIMIT and timing_keys:
        result = {**_drop_times(result, timing_keys), "times": f"dropped: the CPU was {busy:.0%} busy"}
        busy = 0.0
    if busy > BUSY_LIMIT:
        aside = Path(tempfile.gettempdir()) / f"{path.stem}.busy.json"
        atomic_write_text(aside, json.dumps(result, indent=2) + "\n")
        print(f"Another process was using the CPU ({busy:.0%} busy): {path.name} not written (kept in {aside}).")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return True
