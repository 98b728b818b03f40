"""The test harness itself: under tools/test a skipped test fails, elsewhere it says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_skip_fails_under_tools_test() -> None:
    probe = Path(__file__).with_name("skip_probe.py")
    for require, code, said in (("1", 1, "skipped under tools/test"), ("0", 0, "prerequisite is missing")):
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            env={**os.environ, "HAMAL_TEST_REQUIRE_ALL": require},
        )
        assert r.returncode == code and said in r.stdout, r.stdout
