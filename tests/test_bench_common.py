"""benchmarks/common.py's honesty rules: results are written only when no other process used a core (a
quality benchmark keeps its quality and drops its times), and PeakRSS sees an allocation's peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402  (benchmarks/ is not a package: its scripts import common from their folder)


@pytest.fixture
def busy(monkeypatch, tmp_path):
    """Play the CPU's busy share; temporary files go to tmp_path."""
    share = {"now": 0.0}
    monkeypatch.setattr(common, "cpu_busy_fraction", lambda seconds=2.0: share["now"])
    monkeypatch.setattr(common.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return share


def test_results_are_written_only_on_a_quiet_machine(busy, tmp_path, capsys):
    out = tmp_path / "results" / "speed.json"
    assert common.write_result(out, {"step_s": 1.5}, busy_before=0.0)
    written = json.loads(out.read_text())
    assert written["step_s"] == 1.5 and written["cpu_busy_share"] == 0.0 and "load_average" in written["machine"]
    out.unlink()
    busy["now"] = 0.5  # another process took a core during the run
    assert not common.write_result(out, {"step_s": 3.0}, busy_before=0.0)
    assert not out.exists() and "not written" in capsys.readouterr().out
    assert json.loads((tmp_path / "tmp" / "speed.busy.json").read_text())["step_s"] == 3.0  # kept aside
    busy["now"] = 0.0
    assert not common.write_result(out, {"step_s": 3.0}, busy_before=0.3)  # busy when it started
    assert not out.exists()


def test_a_busy_quality_run_keeps_its_quality_and_drops_its_times(busy, tmp_path):
    out = tmp_path / "quality.json"
    busy["now"] = 0.5
    result = {"seconds": 12.0, "rows": [{"top1": 0.4, "seconds": 3.0}]}
    assert common.write_result(out, result, busy_before=0.0, timing_keys=("seconds",))
    written = json.loads(out.read_text())
    assert written["seconds"] is None and written["rows"] == [{"top1": 0.4, "seconds": None}]
    assert "50% busy" in written["times"] and result["rows"][0]["seconds"] == 3.0  # the caller's copy is intact


def test_announce_prints_the_load_average(busy, capsys):
    busy["now"] = 0.25
    assert common.announce() == 0.25
    printed = capsys.readouterr().out
    assert printed.startswith("load average ") and "CPU busy 25%" in printed


def test_peak_rss_sees_a_freed_allocation():
    with common.PeakRSS() as probe:
        block = b"\x01" * (64 * 2**20)  # written pages: resident
        del block
    assert probe.peak >= 60 * 2**20
