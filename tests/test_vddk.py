"""The VDDK source through the fake VixDiskLib (rust/fake-vddk, built here): full and incremental
syncs to raw files and chunk stores compared byte for byte, the library's versions and optional
symbols, injected VDDK errors, a crash inside the library, and the process boundary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import DEFAULT_CONF, MIB, make_image, one_error_line, run_hamal, sha256
from fake_vddk import PASSWORD, FakeVm, build_variants, make_vm
from hamal import _native
from hamal import sync as hsync
from hamal.errors import VddkError

SECTOR = 512


@pytest.fixture(scope="session")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is needed to build the fake VixDiskLib (rust/fake-vddk)")
    return build_variants(tmp_path_factory.mktemp("vddk-libs"))


@pytest.fixture
def vm(tmp_path: Path) -> FakeVm:
    v = make_vm(tmp_path)
    make_image(v.disk, 48 * MIB, seed=5)
    return v


def hamal(vm: FakeVm, *args: str, conf: Path | None = None, **env: str):
    extra = vm.env(**env)
    if conf:
        extra["HAMAL_CONF"] = str(conf)
    return run_hamal(*args, env=extra)


def sync_json(vm: FakeVm, *args: str, **kw) -> dict:
    r = hamal(vm, "sync", *args, "--json", "--no-progress", **kw)
    assert r.code == 0, r.err
    return json.loads(r.out)


def data_bytes(path: Path) -> int:
    """Bytes in the file's data extents (SEEK_DATA / SEEK_HOLE)."""
    total, pos, size = 0, 0, path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total, pos = total + end - start, end
    return total


def per_process(vm: FakeVm) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for c in vm.calls():
        out.setdefault(c.pid, Counter())[c.name] += 1
    return out


def assert_cleaned_up(vm: FakeVm, *, connected: bool = True, opened: bool = True) -> None:
    """Every worker process ended what it began: Close, Disconnect and Exit."""
    procs = per_process(vm)
    assert procs, "no worker ran"
    for pid, c in procs.items():
        assert c["InitEx"] == 1 and c["Exit"] == 1, (pid, c)
        if connected:
            assert c["ConnectEx"] == c["Disconnect"] == 1, (pid, c)
        if opened:
            assert c["Open"] == c["Close"] == 1, (pid, c)


def read_calls(vm: FakeVm) -> list:
    return [c for c in vm.calls() if c.name in ("Read", "ReadAsync")]


def write_conf(path: Path, **vmware: object) -> Path:
    lines = ["[vmware]", *(f"{k} = {v}" for k, v in vmware.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_full_sync_reads_only_allocated_blocks(libs, vm, tmp_path):
    conf = write_conf(tmp_path / "hamal.conf", max_read_blocks=256, vddk_libdir=libs["v8"])
    out = tmp_path / "disk.raw"
    r = hamal(vm, "-v", "sync", vm.uri(), str(out), "--json", "--no-progress", conf=conf)
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert sha256(out) == sha256(vm.disk)
    # The first worker answers size and allocation; the readers' fill the engine's shared
    # buffers in place.
    assert r.err.count("reads_in_place=false") == 1 and r.err.count("reads_in_place=true") == 2, r.err
    assert d["io_backend"] == "vddk"
    calls = vm.calls()
    reads = read_calls(vm)
    assert reads and all(c.name == "ReadAsync" for c in reads)
    assert max(c.n() for c in reads) <= 256
    # QueryAllocatedBlocks answered: only the data is read, not the 48 MiB disk.
    assert sum(c.n() for c in reads) * SECTOR == data_bytes(vm.disk) == d["bytes_written"]
    query = [c for c in calls if c.name == "QueryAllocatedBlocks"]
    assert len(query) == 1 and query[0].args["chunk"] == "128"
    for c in calls:
        if c.name == "Open":
            assert c.args["flags"] == "4", c  # read-only
        if c.name == "ConnectEx":
            a = c.args
            assert (a["readonly"], a["vm"], a["snapshot"]) == ("1", "moref=vm-42", "snapshot-7"), a
            assert (a["transports"], a["cred"], a["user"]) == ("nbdssl:nbd", "uid", "root"), a
            assert a["secret_len"] == str(len(PASSWORD)), a
    assert_cleaned_up(vm)


def test_incremental_reads_only_the_changed_sectors(libs, vm, tmp_path):
    out = tmp_path / "disk.raw"
    uri = vm.uri(libs["v8"])
    sync_json(vm, uri, str(out))
    with open(vm.disk, "r+b") as f:
        for off in (3 * MIB + 100, 17 * MIB, 40 * MIB + 4000):
            f.seek(off)
            f.write(os.urandom(70_000))
    changed = tmp_path / "changed.json"
    pairs = [[3 * MIB + 100, 70_000], [17 * MIB, 70_000], [40 * MIB + 4000, 70_000]]
    changed.write_text(json.dumps(pairs))
    vm.reset()
    d = sync_json(vm, uri, str(out), "--changed", str(changed))
    assert sha256(out) == sha256(vm.disk)
    sectors = set()
    for o, n in pairs:
        sectors |= set(range(o // SECTOR, (o + n + SECTOR - 1) // SECTOR))
    assert sum(c.n() for c in read_calls(vm)) == len(sectors), d
    assert not [c for c in vm.calls() if c.name == "QueryAllocatedBlocks"]
    assert_cleaned_up(vm)
    # verify reads into its own buffers: through the worker's window.
    r = hamal(vm, "verify", uri, str(out))
    assert r.code == 0 and "identical" in r.out, r.err


def test_full_and_incremental_into_a_store_restore_identical(libs, vm, tmp_path):
    store, uri = f"dir:{tmp_path / 'store'}", vm.uri(libs["v8"])
    first = sync_json(vm, uri, store, "--disk", "web")
    v1 = tmp_path / "v1.raw"
    shutil.copy(vm.disk, v1)
    with open(vm.disk, "r+b") as f:
        f.seek(9 * MIB)
        f.write(os.urandom(2 * MIB))
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([[9 * MIB, 2 * MIB]]))
    second = sync_json(vm, uri, store, "--disk", "web", "--changed", str(changed))
    for version, want in ((first["version"], v1), (second["version"], vm.disk)):
        out = tmp_path / f"restore-{version}.raw"
        r = hamal(vm, "restore", store, "--disk", "web", "--version", version, str(out), "--no-progress")
        assert r.code == 0, r.err
        assert sha256(out) == sha256(want), version


def test_vddk6_without_optional_symbols_reads_synchronously(libs, vm, tmp_path):
    out = tmp_path / "disk.raw"
    r = hamal(vm, "-v", "sync", vm.uri(libs["v6"]), str(out), "--json", "--no-progress")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert sha256(out) == sha256(vm.disk)
    # VDDK 6's VixDiskLibInfo has no sector sizes: they are not read.
    assert "libvixDiskLib.so.6" in r.err and "sector_sizes=not reported" in r.err, r.err
    names = {c.name for c in vm.calls()}
    assert "Read" in names
    assert not names & {"ReadAsync", "Wait", "QueryAllocatedBlocks", "AllocateConnectParams"}, names
    # No allocation map: the whole disk is read and its zeros are not written.
    assert sum(c.n() for c in read_calls(vm)) * SECTOR == 48 * MIB
    assert d["bytes_zero"] > 0
    assert_cleaned_up(vm)


def test_session_cookie_transports_and_version_7_fields(libs, vm, tmp_path):
    cookie = tmp_path / "cookie"
    cookie.write_text("vmware_soap_session=abc123\n")
    uri = vm.uri(libs["v8"], transports="hotadd:nbd").replace(
        f"password_file={vm.password_file}", f"cookie_file={cookie}"
    )
    out = tmp_path / "disk.raw"
    r = hamal(
        vm, "-v", "sync", uri, str(out), "--no-progress", FAKE_VDDK_PASSWORD="vmware_soap_session=abc123"
    )
    assert r.code == 0, r.err
    assert sha256(out) == sha256(vm.disk)
    assert "sector_sizes=512/4096" in r.err and "abc123" not in r.err, r.err
    connects = [c.args for c in vm.calls() if c.name == "ConnectEx"]
    assert connects and all(a["cred"] == "session" and a["transports"] == "hotadd:nbd" for a in connects)


def test_a_failing_query_of_allocated_blocks_is_skipped(libs, vm, tmp_path):
    vm.fail = "query"
    out = tmp_path / "disk.raw"
    sync_json(vm, vm.uri(libs["v8"]), str(out))
    assert sha256(out) == sha256(vm.disk)
    assert [c for c in vm.calls() if c.name == "QueryAllocatedBlocks"]
    assert sum(c.n() for c in read_calls(vm)) * SECTOR == 48 * MIB


@pytest.mark.parametrize(
    ("fault", "env", "text", "cleanup"),
    [
        ("connect", {}, "connection refused (VDDK error 18000)", "init"),
        ("", {"FAKE_VDDK_THUMBPRINT": ":".join(["AA"] * 20)}, "thumbprint does not match", "init"),
        ("", {"FAKE_VDDK_PASSWORD": "other"}, "incorrect user name or password", "init"),
        ("open", {}, "Open failed: The file was not found (VDDK error 4)", "connect"),
        ("read:40000", {}, "Read of 1024 sectors at sector 39936 (offset 20447232) failed", "all"),
    ],
)
def test_vddk_errors_name_the_disk_and_keep_the_store(libs, vm, tmp_path, fault, env, text, cleanup):
    store, uri = f"dir:{tmp_path / 'store'}", vm.uri(libs["v8"])
    first = sync_json(vm, uri, store, "--disk", "web")
    v1 = tmp_path / "v1.raw"
    shutil.copy(vm.disk, v1)
    with open(vm.disk, "r+b") as f:
        f.seek(19 * MIB)  # sector 38912..: the injected read error at sector 40000 hits it
        f.write(os.urandom(2 * MIB))
    vm.fail, changed = fault, tmp_path / "changed.json"
    changed.write_text(json.dumps([[19 * MIB, 2 * MIB]]))
    vm.reset()
    r = hamal(vm, "sync", uri, store, "--disk", "web", "--changed", str(changed), "--no-progress", **env)
    assert r.code != 0
    line = one_error_line(r.err)
    assert "VDDK disk '[ds1] vm/disk.vmdk' of vm-42 on 127.0.0.1" in line and text in line, line
    if fault.startswith("read"):
        assert "A file access error occurred" in line and "offset" in line, line
    assert PASSWORD not in r.err
    assert_cleaned_up(vm, connected=cleanup != "init", opened=cleanup == "all")
    # The committed state is untouched: still one version, restoring the first sync.
    vm.fail = ""
    r = hamal(vm, "versions", store, "--disk", "web", "--json")
    assert r.code == 0, r.err
    assert [v["version"] for v in json.loads(r.out)["versions"]] == [first["version"]]
    out = tmp_path / "restored.raw"
    assert hamal(vm, "restore", store, "--disk", "web", str(out), "--no-progress").code == 0
    assert sha256(out) == sha256(v1)


def test_missing_library_or_symbol_names_what_was_probed(libs, vm, tmp_path):
    empty = tmp_path / "no-vddk"
    (empty / "lib64").mkdir(parents=True)
    r = hamal(vm, "sync", vm.uri(empty), str(tmp_path / "a.raw"), "--no-progress")
    line = one_error_line(r.err)
    assert r.code != 0 and f"no VDDK in {empty}/lib64" in line and "libvixDiskLib.so" in line, line
    r = hamal(vm, "sync", vm.uri(libs["no_read"]), str(tmp_path / "b.raw"), "--no-progress")
    line = one_error_line(r.err)
    lib = libs["no_read"] / "lib64" / "libvixDiskLib.so.8"
    assert r.code != 0 and f"{lib} lacks the required symbol VixDiskLib_Read" in line, line
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "b.raw").exists()


def test_bad_uris_and_vddk_as_a_target(libs, vm, tmp_path):
    base = vm.uri(libs["v8"])
    for uri, why in [
        (base.replace("&snapshot=snapshot-7", ""), "'snapshot=' is required"),
        (base.replace("root@", "root:pw@"), "a password does not go in the URI"),
        (base + "&colour=red", "unknown option 'colour'"),
        (base.replace("password_file=", "password_file=/nonexistent"), "cannot read the password file"),
    ]:
        r = hamal(vm, "sync", uri, str(tmp_path / "x.raw"), "--no-progress")
        line = one_error_line(r.err)
        assert r.code != 0 and why in line, line
    r = hamal(vm, "sync", str(vm.disk), base, "--no-progress")
    assert r.code != 0 and "sources only" in one_error_line(r.err)


def test_vddk_stays_out_of_the_calling_process_and_a_crash_fails_only_that_disk(
    libs, vm, tmp_path, monkeypatch
):
    for k, v in vm.env(FAKE_VDDK_FAIL="abort:20000").items():
        monkeypatch.setenv(k, v)
    uri, out = vm.uri(libs["v8"]), tmp_path / "disk.raw"
    conf = tmp_path / "hamal.conf"
    conf.write_text("[vmware]\nmax_read_blocks = 128\n")
    job = _native.start_sync([hsync.disk(uri, str(out))], _native.load_config(str(conf)))
    with pytest.raises(VddkError) as e:
        job.wait(60)
    msg = str(e.value)
    assert "killed by signal 6 (SIGABRT)" in msg and "[ds1] vm/disk.vmdk" in msg, msg
    assert "libvixDiskLib" not in Path("/proc/self/maps").read_text()
    # This process is fine and the next sync of the disk works.
    monkeypatch.setenv("FAKE_VDDK_FAIL", "")
    job = _native.start_sync([hsync.disk(uri, str(out))])
    job.wait(60)
    assert sha256(out) == sha256(vm.disk)
    assert "libvixDiskLib" not in Path("/proc/self/maps").read_text()


def test_a_crash_mid_sync_then_a_rerun_resumes(libs, vm, tmp_path):
    """The CLI's sync dies with the worker (abort at sector 80000, ~40 MiB in); finished chunks
    are journaled, so the rerun reads only the rest and ends identical."""
    uri, out = vm.uri(libs["v8"]), tmp_path / "disk.raw"
    env = {**os.environ, **vm.env(FAKE_VDDK_FAIL="abort:80000"), "HAMAL_CONF": str(DEFAULT_CONF)}
    cmd = [sys.executable, "-m", "hamal", "sync", uri, str(out), "--no-progress"]
    p = subprocess.run(
        [*cmd, "--bwlimit", "8M", "--fsync-period", "0.3", "--readers", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode != 0
    assert "SIGABRT" in one_error_line(p.stderr)
    again = sync_json(vm, uri, str(out))
    assert again["bytes_resumed"] > 0, again
    assert sha256(out) == sha256(vm.disk)


def test_the_wheel_ships_the_worker_but_no_vddk():
    from test_install import wheel

    names = zipfile.ZipFile(wheel()).namelist()
    assert "hamal/_vddk_worker.py" in names
    assert not [n for n in names if "vixDiskLib" in n or "fake" in n], names


def test_workers_clean_up_when_the_engine_is_killed(libs, vm, tmp_path):
    """SIGKILL of the syncing process: its workers see the pipe close and still Close,
    Disconnect and Exit."""
    uri, out = vm.uri(libs["v8"]), tmp_path / "disk.raw"
    env = {**os.environ, **vm.env(), "HAMAL_CONF": str(DEFAULT_CONF)}
    cmd = [sys.executable, "-m", "hamal", "sync", uri, str(out), "--no-progress", "--bwlimit", "4M"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(read_calls(vm)) < 20:
        time.sleep(0.05)
    assert read_calls(vm), "the sync never started reading"
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs = per_process(vm)
        if procs and all(c["Exit"] == 1 for c in procs.values()):
            break
        time.sleep(0.1)
    assert_cleaned_up(vm)


def test_map_lists_what_query_allocated_blocks_reports(libs, vm, tmp_path):
    conf = write_conf(tmp_path / "hamal.conf", vddk_libdir=libs["v8"])
    r = hamal(vm, "map", vm.uri(), "--json", conf=conf)
    assert r.code == 0, r.err
    m = json.loads(r.out)
    assert m["size"] == 48 * MIB
    assert sum(n for _, n in m["allocated"]) == data_bytes(vm.disk)


def test_two_disks_of_a_vm_sync_in_parallel(libs, vm, tmp_path, monkeypatch):
    second = vm.root / "vm" / "data.vmdk"
    make_image(second, 24 * MIB, seed=9)
    for k, v in vm.env().items():
        monkeypatch.setenv(k, v)
    outs = [tmp_path / "boot.raw", tmp_path / "data.raw"]
    disks = [
        hsync.disk(vm.uri(libs["v8"]), str(outs[0]), disk_id="boot"),
        hsync.disk(vm.uri(libs["v8"], disk="vm/data.vmdk"), str(outs[1]), disk_id="data"),
    ]
    results = _native.start_sync(disks, parallel_disks=2).wait(120)
    assert results is not None and [r["disk_id"] for r in results] == ["boot", "data"]
    assert sha256(outs[0]) == sha256(vm.disk) and sha256(outs[1]) == sha256(second)
    opens = [c.args for c in vm.calls() if c.name == "Open"]
    assert {a["path"] for a in opens} == {"[ds1]%20vm/disk.vmdk", "[ds1]%20vm/data.vmdk"}
    assert all(a["flags"] == "4" and a["snapshot"] == "snapshot-7" for a in opens)
    assert_cleaned_up(vm)


def test_a_hung_vddk_read_fails_the_disk_within_the_timeout(libs, vm, tmp_path):
    vm.fail = "hang:40000"
    began = time.monotonic()
    r = hamal(vm, "sync", vm.uri(libs["v8"], timeout="2"), str(tmp_path / "disk.raw"), "--no-progress")
    took = time.monotonic() - began
    line = one_error_line(r.err)
    assert r.code != 0 and "VDDK did not answer within 2 s; its worker was stopped" in line, line
    assert took < 20, f"took {took:.1f} s"
    hung = [c.pid for c in vm.calls() if c.name == "hang"]
    assert hung and not any(Path(f"/proc/{pid}").exists() for pid in hung)
