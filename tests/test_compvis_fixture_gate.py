"""The CompVis fixture tests skip without their fixtures, except under CI (CI=true), where they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compvis_fixtures import require_fixtures

ROOT = Path(__file__).resolve().parent.parent


def test_present_fixtures_let_the_tests_run(tmp_path):
    (tmp_path / "manifest.json").write_text("{}", encoding="utf-8")
    require_fixtures(tmp_path, {"CI": "true"})  # neither skips nor fails


@pytest.mark.parametrize("environ", [{}, {"CI": "false"}, {"CI": ""}, {"CI": "0"}])
def test_missing_fixtures_skip_outside_ci(tmp_path, environ):
    with pytest.raises(pytest.skip.Exception, match="CompVis fixtures not found"):
        require_fixtures(tmp_path, environ)


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_missing_fixtures_fail_under_ci(tmp_path, value):
    with pytest.raises(pytest.fail.Exception, match="CompVis fixtures not found.*CI=true"):
        require_fixtures(tmp_path, {"CI": value})


def _run_fixture_test(fixtures: Path, ci: str | None) -> subprocess.CompletedProcess:
    """One real CompVis fixture test, in a fresh pytest, with the fixtures looked for in ``fixtures``."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["LDMKIT_COMPVIS_FIXTURES"] = str(fixtures)
    if ci is not None:
        env["CI"] = ci
    test = "tests/test_compvis_reference.py::test_use_ema_without_ema_weights_is_an_error"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_fixture_tests_use_the_gate(tmp_path):
    """End to end: the mark on the CompVis test modules reaches require_fixtures."""
    skipped = _run_fixture_test(tmp_path, ci=None)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout + skipped.stderr
    failed = _run_fixture_test(tmp_path, ci="true")
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout + failed.stderr
    assert "CI=true, where they are required" in failed.stdout
