"""The container an operator runs, on this machine's Docker: the base image built from Debian
without a registry, the release bundle (tools/release) unpacked and installed with its
update_sync_proxy.sh (image loaded from the bundle, dependencies from its wheelhouse),
docker-compose up, healthy, a standalone task synced inside the container, restart, upgrade,
an upgrade that never becomes healthy (automatic return), uninstall."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import make_image, sha256
from nbd_servers import qemu_io
from test_install import ROOT


def sh(*cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert not check or r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}{r.stdout}"
    return r


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None or sh("docker", "info", check=False).returncode:
        pytest.skip("no Docker daemon here (the project's machines have one)")
    return sh(str(ROOT / "tools" / "build-image")).stdout.strip().splitlines()[-1]


def test_install_run_upgrade_and_return_in_a_container(tmp_path: Path, image: str) -> None:
    root = Path(f"/tmp/hamal-docker-{os.getpid()}")  # short paths, mounted as they are
    shutil.rmtree(root, ignore_errors=True)
    prefix, etc, lib, log, bundle = (root / d for d in ("opt", "etc", "lib", "log", "bundle"))
    for d in (etc, lib / "tasks", lib / "img", bundle):
        d.mkdir(parents=True)
    tarball = sh(str(ROOT / "tools" / "release")).stdout.strip().splitlines()[-1]
    sh("tar", "-C", str(bundle), "--strip-components=1", "-xzf", tarball)
    assert {"update_sync_proxy.sh", "uninstall_hamal.sh", "hamal-venv-layout", "wheelhouse", "hamal-base.tar",
            "image-tag"} <= set(os.listdir(bundle))  # fmt: skip
    assert (bundle / "image-tag").read_text().strip() == image
    sh("docker", "rmi", image)  # an air-gapped host: the image comes from the bundle
    (etc / "hamal.conf").write_text(
        f"[DEFAULT]\nhamal_lib_dir = {lib}\nhamal_info_path = {lib}/hamal_info\nlog_dir = {log}\n"
        f"[period]\ninterval = 3\ntasks_dir = {lib}/tasks\n[metrics]\nlisten =\n"
    )
    img = lib / "img" / "vm.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    qemu_io(img, "write -P 0x11 0 6M")
    task = {"version": 1, "vm": {"platform": "kvm", "uuid": "u1", "name": "vm"},
            "connection": {"images": {"vda": str(img)}}, "target": {"uri": f"dir:{lib}/store"}}  # fmt: skip
    (lib / "tasks" / "vm.json").write_text(json.dumps(task))
    env = {
        "HAMAL_PREFIX": str(prefix),
        "HAMAL_ETC": str(etc),
        "HAMAL_LIB_DIR": str(lib),
        "HAMAL_LOG_DIR": str(log),
        "HAMAL_COMPOSE_PROJECT": f"hamaltest{os.getpid()}",
        "HAMAL_HEALTH_TIMEOUT": "90",
    }
    compose = ["docker-compose", "-f", str(prefix / "docker-compose-hamal.yaml")]
    update = str(bundle / "update_sync_proxy.sh")
    try:
        t0 = time.monotonic()
        sh(update, env=env)
        install_s = time.monotonic() - t0
        assert "Up (healthy)" in sh(*compose, "ps").stdout
        # Least privilege: no capability but DAC_READ_SEARCH, a read-only root, the release and
        # its config read-only, no privilege through set-uid files.
        (cid,) = sh(*compose, "ps", "-q").stdout.split()
        host = json.loads(sh("docker", "inspect", cid).stdout)[0]["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["DAC_READ_SEARCH"], host
        assert host["ReadonlyRootfs"] and "no-new-privileges:true" in host["SecurityOpt"], host
        for where in ("/usr/x", f"{prefix}/x", f"{etc}/x"):
            assert sh(*compose, "exec", "-T", "hamal", "touch", where, check=False).returncode != 0, where
        hamal = [*compose, "exec", "-T", "hamal", f"{prefix}/hamal-venv/bin/hamal"]

        def committed() -> list[dict]:
            r = sh(*hamal, "status", "--json", check=False)
            if r.returncode:
                return []
            (t,) = json.loads(r.stdout)["tasks"] or [{"disks": []}]
            return [d for d in t["disks"] if d["version"]]

        wait(lambda: committed(), "a cycle inside the container")
        (disk,) = committed()
        out = lib / "restored.raw"
        sh(*hamal, "restore", f"dir:{lib}/store", str(out), "--disk", "vm-vda", "--version", disk["version"])
        ref = lib / "ref.raw"
        sh("qemu-img", "convert", "-U", "-O", "raw", str(img), str(ref))
        assert sha256(out) == sha256(ref)
        assert {"hamal-period.log", "hamal-period-subprocess.log", "vm-vm-u1.log"} <= set(os.listdir(log))

        def versions() -> list[dict]:
            return json.loads(sh(*hamal, "versions", f"dir:{lib}/store", "--json").stdout)["versions"]

        before = len(versions())
        sh(*compose, "restart")
        wait(lambda: "Up (healthy)" in sh(*compose, "ps").stdout, "healthy after a restart")
        wait(lambda: len(versions()) > before, "a cycle after the restart")
        assert versions()[-1]["stats"]["mode"] == "incremental", "the cursor survived the restart"

        first = os.readlink(prefix / "hamal-venv")
        t0 = time.monotonic()
        sh(update, env=env)
        upgrade_s = time.monotonic() - t0
        second = os.readlink(prefix / "hamal-venv")
        assert second != first and "Up (healthy)" in sh(*compose, "ps").stdout
        qemu_io(img, "write -P 0x22 1M 64k")
        wait(lambda: committed() and committed()[0]["version"] != disk["version"], "an incremental cycle")
        assert committed()[0]["cursor"] != disk["cursor"]

        broken = {**env, "HAMAL_UPDATE_BREAK_SERVICE": "1", "HAMAL_HEALTH_TIMEOUT": "20"}
        r = sh(update, env=broken, check=False)
        assert r.returncode == 1 and f"returned to {second.split('/')[-1]}" in r.stderr, r.stderr
        assert os.readlink(prefix / "hamal-venv") == second
        wait(lambda: "Up (healthy)" in sh(*compose, "ps").stdout, "healthy on the previous release")
        print(f"install to healthy {install_s:.1f} s, upgrade {upgrade_s:.1f} s")
        sh(str(prefix / "uninstall_hamal.sh"), env=env)
        assert not prefix.exists() and (etc / "hamal.conf").exists() and (lib / "hamal.db").exists()
        assert "hamal" not in sh("docker", "ps", "-a", "--format", "{{.Names}}").stdout
    finally:
        if (prefix / "docker-compose-hamal.yaml").exists():
            subprocess.run([*compose, "down"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def wait(check, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(1)


def test_the_wheel_runs_on_bullseye_glibc_2_31_python_3_9(tmp_path: Path, image: str) -> None:
    """Hosts like Ubuntu 20.04 (glibc 2.31, Python 3.9): the wheel installs offline and syncs."""
    wheelhouse = os.environ.get("HAMAL_WHEELHOUSE_PY39")
    if not wheelhouse:
        pytest.skip("HAMAL_WHEELHOUSE_PY39 is not set (tools/test downloads it)")
    old = sh(str(ROOT / "tools" / "build-image"), "bullseye", "python3,python3-venv", "hamal-bullseye")
    tag = old.stdout.strip().splitlines()[-1]
    data = tmp_path / "data"
    data.mkdir()
    make_image(data / "src.raw", 32 << 20)
    script = (
        "set -e; ldd --version | head -1; python3 --version; python3 -m venv /v; "
        "/v/bin/pip install -q --no-index --find-links /wh hamal; "
        "/v/bin/hamal sync /data/src.raw /data/dst.raw; cmp /data/src.raw /data/dst.raw; echo same"
    )
    r = sh(
        "docker", "run", "--rm", "-v", f"{wheelhouse}:/wh:ro", "-v", f"{data}:/data", tag, "sh", "-c", script
    )
    assert "GLIBC 2.31" in r.stdout and "Python 3.9." in r.stdout, r.stdout
    assert r.stdout.strip().endswith("same"), r.stdout + r.stderr
    assert sha256(data / "dst.raw") == sha256(data / "src.raw")
