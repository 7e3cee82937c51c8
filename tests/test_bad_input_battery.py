"""Issue 15's battery (ldmkit.testing.bad_inputs, also run by benchmarks/bad_inputs_battery.py): every case
gives its correct outcome, and the counts of the closing note hold: >= 106 tried, 0 tracebacks, 0 silent
garbage, 0 leftover files, 0 unbounded."""

from __future__ import annotations

from ldmkit.testing import bad_inputs


def test_the_whole_battery():
    report = bad_inputs.run_battery()
    assert report["tried"] >= 106
    assert report["tracebacks"] == report["silent garbage"] == report["leftover files"] == report["unbounded"] == 0
    assert report["wrong outcome"] == []
    assert report["clear errors"] + report["correct accepts"] == report["tried"]


def test_the_classifier_sees_tracebacks_garbage_and_leftovers():
    """The battery can fail: a raw exception, a constant image and a temporary file are each counted."""
    class Out:
        images = [[[0.5, 0.5], [0.5, 0.5]]]

    def leave_tmp(folder):
        (folder / ".x.png.tmp").write_bytes(b"")
        raise KeyError("boom")

    cases = [bad_inputs.Case("raw", "api", lambda f: {}["x"]), bad_inputs.Case("flat", "api", lambda f: Out(),
                                                                                 accept=True),
             bad_inputs.Case("tmp", "api", leave_tmp)]
    report = bad_inputs.run_battery(cases)
    assert (report["tracebacks"], report["silent garbage"], report["leftover files"]) == (2, 1, 1)
    assert report["wrong outcome"] == ["raw", "flat", "tmp"]
