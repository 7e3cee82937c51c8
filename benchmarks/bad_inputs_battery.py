"""Issue 15's battery of bad inputs (ldmkit.testing.bad_inputs: the Python API, loading and the CLI), with the
counts of its closing note: tried, clear errors, correct accepts, tracebacks, silent garbage, leftover files,
unbounded. Writes benchmarks/results/bad-inputs.json.

    PYTHONPATH=src python benchmarks/bad_inputs_battery.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ldmkit.io import atomic_path
from ldmkit.testing.bad_inputs import run_battery

RESULT = Path(__file__).resolve().parent / "results" / "bad-inputs.json"
COUNTS = ("tried", "clear errors", "correct accepts", "tracebacks", "silent garbage", "leftover files", "unbounded")


def main() -> int:
    report = run_battery()
    for key in COUNTS:
        print(f"{key:16s} {report[key]}")
    for case in report["cases"]:
        if not case["correct"] or case["leftovers"]:
            print(f"WRONG: {case}")
    with atomic_path(RESULT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    bad = report["tracebacks"] + report["silent garbage"] + report["leftover files"] + report["unbounded"]
    return 1 if bad or report["wrong outcome"] else 0


if __name__ == "__main__":
    sys.exit(main())
