"""update_sync_proxy.sh and uninstall_hamal.sh: the /opt/hamal layout of the operator's manual,
upgrades that keep the config and roll back on failure, and removal."""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_ENTRIES = {
    "bin",
    "include",
    "lib",
    "project_etc",
    "pyvenv.cfg",
    "tools",
    "version",
    "hamal3-changelog.txt",
}


def wheel() -> str:
    wheels = sorted(glob.glob(str(ROOT / "dist" / "hamal-*.whl")), key=os.path.getmtime)
    if not wheels:
        pytest.fail("no wheel in dist/: run tools/test, which builds it before pytest")
    return wheels[-1]


def run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env={**os.environ, **env})


def test_install_upgrade_rollback_uninstall(tmp_path: Path) -> None:
    prefix, etc = tmp_path / "opt" / "hamal", tmp_path / "etc" / "hamal"
    env = {
        "HAMAL_PREFIX": str(prefix),
        "HAMAL_ETC": str(etc),
        "HAMAL_LOG_DIR": str(tmp_path / "log"),
        "HAMAL_LIB_DIR": str(tmp_path / "lib"),
    }
    r = run(str(ROOT / "update_sync_proxy.sh"), wheel(), env=env)
    assert r.returncode == 0, r.stderr
    venv = prefix / "hamal-venv"
    assert VENV_ENTRIES <= set(os.listdir(venv)), os.listdir(venv)
    assert (prefix / "update_sync_proxy.sh").exists() and (prefix / "uninstall_hamal.sh").exists()
    assert (etc / "hamal.conf").exists() and (tmp_path / "log").is_dir()
    version = (venv / "version").read_text().strip()
    assert version and version[0].isdigit()
    check = subprocess.run(
        [venv / "bin" / "hamal", "config", "check", etc / "hamal.conf"], capture_output=True
    )
    assert check.returncode == 0 and check.stderr == b"", check.stderr

    # An upgrade keeps the operator's config...
    (etc / "hamal.conf").write_text("[period]\ninterval = 30\n")
    r = run(str(prefix / "update_sync_proxy.sh"), wheel(), env=env)
    assert r.returncode == 0, r.stderr
    assert (etc / "hamal.conf").read_text() == "[period]\ninterval = 30\n"
    # ...and when the new version rejects the config, the previous installation stays.
    (etc / "hamal.conf").write_text("[period]\ninterval = never\n")
    marker = venv / "marker"
    marker.write_text("previous")
    r = run(str(prefix / "update_sync_proxy.sh"), wheel(), env=env)
    assert r.returncode != 0 and "previous installation is kept" in r.stderr
    assert marker.read_text() == "previous"
    assert (venv / "bin" / "hamal").exists()

    r = run(str(prefix / "uninstall_hamal.sh"), env=env)
    assert r.returncode == 0, r.stderr
    assert not prefix.exists()
    assert (etc / "hamal.conf").exists(), "config is kept without --purge"
