"""No hangs in the suite: pyproject.toml gives every test a timeout (pytest-timeout), and a test running past it
fails (it does not hang the run)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib

from tests.repo import REPO


def test_the_suite_configures_a_per_test_timeout():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert isinstance(ini.get("timeout"), int) and 300 <= ini["timeout"] <= 1200, ini.get("timeout")


def test_a_test_past_its_timeout_fails_instead_of_hanging(tmp_path):
    """An inner pytest run under the repository's own pytest configuration (``-c pyproject.toml``), its timeout
    lowered to 3 s: the sleeping test fails with pytest-timeout's message and the run ends."""
    (tmp_path / "test_sleeper.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(120)\n\n"
                                             "def test_after():\n    assert True\n")
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.path.join(REPO, "pyproject.toml"),
                          "--rootdir", str(tmp_path), "-o", "timeout=3", str(tmp_path / "test_sleeper.py")],
                         capture_output=True, text=True, timeout=90, cwd=tmp_path)
    took = time.monotonic() - start
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "Timeout" in out and "1 failed, 1 passed" in out, out
    assert took < 60, f"the inner run took {took:.0f} s"
