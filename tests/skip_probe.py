"""Run only by test_harness.py: a test that skips, to see what tools/test makes of a skip."""

import pytest


def test_probe() -> None:
    pytest.skip("the probe's prerequisite is missing")
