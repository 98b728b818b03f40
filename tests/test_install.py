"""update_sync_proxy.sh and uninstall_hamal.sh: the /opt/hamal layout of the operator's manual,
upgrades that keep the config and roll back on failure, and removal."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile
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
    assert r.returncode != 0 and "the current release is kept" in r.stderr
    assert marker.read_text() == "previous"
    assert (venv / "bin" / "hamal").exists()
    assert len(os.listdir(prefix / "releases")) == 2, "the refused build is gone"

    r = run(str(prefix / "uninstall_hamal.sh"), env=env)
    assert r.returncode == 0, r.stderr
    assert not prefix.exists()
    assert (etc / "hamal.conf").exists(), "config is kept without --purge"


def releases(prefix: Path) -> list[str]:
    return sorted(os.listdir(prefix / "releases"))


def works(prefix: Path) -> str:
    """The installed release's version, after checking that its command runs."""
    r = subprocess.run([prefix / "hamal-venv" / "bin" / "hamal", "--version"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return os.readlink(prefix / "hamal-venv")


@pytest.mark.parametrize("step", ["venv", "pip", "checked", "backup", "switched"])
def test_an_update_killed_at_any_step_leaves_a_working_release(tmp_path: Path, step: str) -> None:
    prefix = tmp_path / "opt" / "hamal"
    lib = tmp_path / "lib"
    env = {"HAMAL_PREFIX": str(prefix), "HAMAL_ETC": str(tmp_path / "etc"), "HAMAL_LIB_DIR": str(lib),
           "HAMAL_LOG_DIR": str(tmp_path / "log")}  # fmt: skip
    assert run(str(ROOT / "update_sync_proxy.sh"), wheel(), env=env).returncode == 0
    before = works(prefix)
    lib.mkdir(exist_ok=True)
    from hamal.service.state import State

    State(str(lib / "hamal.db")).close()
    r = run(str(prefix / "update_sync_proxy.sh"), wheel(), env={**env, "HAMAL_UPDATE_KILL_AT": step})
    assert r.returncode == -9 or r.returncode == 137, (r.returncode, r.stderr)
    now = works(prefix)
    assert now == before or step == "switched", "the old release serves until the switch"
    r = run(str(prefix / "update_sync_proxy.sh"), wheel(), env=env)
    assert r.returncode == 0, r.stderr
    works(prefix)
    assert all((prefix / "releases" / x / ".complete").exists() for x in releases(prefix)), (
        "no half-built release"
    )
    assert len(releases(prefix)) == 2, "the current and the previous release are kept"


def test_rollback_returns_to_the_previous_release(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "hamal"
    env = {"HAMAL_PREFIX": str(prefix), "HAMAL_ETC": str(tmp_path / "etc"),
           "HAMAL_LIB_DIR": str(tmp_path / "lib"), "HAMAL_LOG_DIR": str(tmp_path / "log")}  # fmt: skip
    r = run(str(ROOT / "update_sync_proxy.sh"), "--rollback", env=env)
    assert r.returncode == 1 and "no previous release" in r.stderr
    assert run(str(ROOT / "update_sync_proxy.sh"), wheel(), env=env).returncode == 0
    first = works(prefix)
    assert run(str(prefix / "update_sync_proxy.sh"), wheel(), env=env).returncode == 0
    second = works(prefix)
    assert second != first and os.readlink(prefix / "hamal-venv.prev") == first
    r = run(str(prefix / "update_sync_proxy.sh"), "--rollback", env=env)
    assert r.returncode == 0, r.stderr
    assert works(prefix) == first and os.readlink(prefix / "hamal-venv.prev") == second
    r = run(str(prefix / "uninstall_hamal.sh"), "--purge", env=env)
    assert r.returncode == 0 and not prefix.exists() and not (tmp_path / "etc").exists()


def test_help_changes_nothing_and_purge_keeps_what_hamal_did_not_create(tmp_path: Path) -> None:
    """--help of either script only prints (uninstall removed everything at once; update exited 1
    and made /opt/hamal/releases); --purge removes hamal's own config, state and logs, but never
    a chunk store, an image or a key file that lives beside them."""
    prefix, etc, lib, log = (tmp_path / d for d in ("opt", "etc", "lib", "log"))
    env = {"HAMAL_PREFIX": str(prefix), "HAMAL_ETC": str(etc), "HAMAL_LIB_DIR": str(lib),
           "HAMAL_LOG_DIR": str(log)}  # fmt: skip
    r = run(str(ROOT / "update_sync_proxy.sh"), "--help", env=env)
    assert r.returncode == 0 and "Usage: update_sync_proxy.sh" in r.stdout and not prefix.exists(), r.stderr
    r = run(str(ROOT / "update_sync_proxy.sh"), "--bogus", env=env)
    assert r.returncode == 1 and "nothing was changed" in r.stderr and not prefix.exists(), r.stderr
    for d in (prefix / "hamal-venv", etc, lib / "journal", lib / "store" / "chunks", lib / "img", log):
        d.mkdir(parents=True)
    ours = (etc / "hamal.conf", lib / "hamal.db", lib / "hamal.db.before-1", log / "x.log")
    for f in (*ours, etc / "store.key"):
        f.write_text("x")
    (lib / "store" / "hamal-store.json").write_text("{}")
    (lib / "img" / "vm.qcow2").write_text("disk")
    for args, code in ((["--help"], 0), (["--purge", "--now"], 2), (["-p"], 2)):
        r = run(str(ROOT / "uninstall_hamal.sh"), *args, env=env)
        assert r.returncode == code and (prefix / "hamal-venv").exists(), (args, r.stderr)
    r = run(str(ROOT / "uninstall_hamal.sh"), "--purge", env=env)
    assert r.returncode == 0, r.stderr
    assert not prefix.exists() and not log.exists()
    assert sorted(p.name for p in etc.iterdir()) == ["store.key"]
    assert sorted(p.name for p in lib.iterdir()) == ["img", "store"]
    assert (lib / "store" / "hamal-store.json").exists() and (lib / "img" / "vm.qcow2").read_text() == "disk"
    assert f"kept {lib}" in r.stderr and "store" in r.stderr and f"kept {etc}" in r.stderr


def test_the_wheel_is_manylinux_2_28_or_older_and_stripped(tmp_path: Path) -> None:
    """Installs on glibc 2.28+ hosts (Ubuntu 20.04 has 2.31); the extension carries no symbol table."""
    whl = wheel()
    r = subprocess.run([sys.executable, "-m", "auditwheel", "show", whl], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    m = re.search(r'consistent with the following platform tag: "manylinux_2_(\d+)_x86_64"', text)
    assert m and int(m.group(1)) <= 31, text
    glibc = {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([\d.]+)", text)}
    assert max(glibc) <= (2, 28), sorted(glibc)
    with zipfile.ZipFile(whl) as z:
        (so,) = [n for n in z.namelist() if n.endswith(".so")]
        z.extract(so, tmp_path)
    sections = subprocess.run(["readelf", "-S", str(tmp_path / so)], capture_output=True, text=True).stdout
    assert ".text" in sections and ".symtab" not in sections
