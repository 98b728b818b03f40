"""The KVM/qcow2 adapter: bitmap rotation around real syncs, over a real qemu-nbd export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hamal
import pytest
from conftest import DEFAULT_CONF, MIB, run_hamal, sha256
from hamal.platforms import kvm
from nbd_servers import qemu_io


def as_raw(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "128M"], check=True)
    qemu_io(img, "write -P 0x11 0 6M", "write -P 0x22 64M 3M")
    return img


def run_cycle(image: Path, target: Path, state: Path, **kw) -> dict:
    cfg = hamal.load_config(str(DEFAULT_CONF))
    return kvm.sync_image(str(image), str(target), cfg, state_dir=str(state), **kw)


def test_cycles_rotate_bitmaps_and_read_only_changes(image: Path, tmp_path: Path) -> None:
    target, state = tmp_path / "target.raw", tmp_path / "state"
    first = run_cycle(image, target, state)
    assert first["mode"] == "full" and first["bytes_total"] == 9 * MIB
    assert list(kvm.bitmaps(str(image))) == [first["bitmap"]]
    assert sha256(as_raw(image, tmp_path / "a.raw")) == sha256(target)

    qemu_io(image, "write -P 0x44 2M 128k", "write -P 0x55 100M 64k")
    second = run_cycle(image, target, state)
    assert second["mode"] == "incremental"
    assert second["bytes_total"] == 128 * 1024 + 64 * 1024  # only what qemu-io wrote
    assert list(kvm.bitmaps(str(image))) == [second["bitmap"]] != [first["bitmap"]]
    assert sha256(as_raw(image, tmp_path / "b.raw")) == sha256(target)

    third = run_cycle(image, target, state)  # nothing written since
    assert third["bytes_total"] == 0
    assert sha256(as_raw(image, tmp_path / "c.raw")) == sha256(target)


def test_cycles_into_a_chunk_store(image: Path, tmp_path: Path) -> None:
    store, state = f"dir:{tmp_path / 'store'}", tmp_path / "state"
    first = run_cycle(image, store, state)
    qemu_io(image, "write -P 0x77 5M 64k")
    second = run_cycle(image, store, state)
    assert second["mode"] == "incremental"
    assert second["bytes_total"] == 4 * MIB, "the dirty 64 KiB is read as its whole 4 MiB chunk"
    r = run_hamal("versions", store, "--json")
    versions = json.loads(r.out)["versions"]
    assert [v["cursor"] for v in versions] == [first["bitmap"], second["bitmap"]]
    out = tmp_path / "restored.raw"
    assert run_hamal("restore", store, str(out), "--disk", "vm.qcow2").code == 0
    assert sha256(as_raw(image, tmp_path / "now.raw")) == sha256(out)


def test_failed_cycle_keeps_the_cursor(image: Path, tmp_path: Path) -> None:
    target, state = tmp_path / "target.raw", tmp_path / "state"
    first = run_cycle(image, target, state)
    qemu_io(image, "write -P 0x66 10M 1M")
    small = tmp_path / "small.raw"
    small.write_bytes(b"x")
    with pytest.raises(hamal.PlanError, match="smaller than the source"):
        run_cycle(image, small, state)  # another target: its own cursor, and it fails
    with pytest.raises(hamal.HamalError):
        run_cycle(image, target, state, journal="/nonexistent-dir/j")  # fails before committing
    assert list(kvm.bitmaps(str(image))) == [first["bitmap"]], "the new bitmap is removed, the cursor kept"
    again = run_cycle(image, target, state)
    assert again["mode"] == "incremental" and again["bytes_total"] == MIB
    assert sha256(as_raw(image, tmp_path / "d.raw")) == sha256(target)


def test_two_targets_keep_their_own_cursors(image: Path, tmp_path: Path) -> None:
    a, b, state = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "state"
    run_cycle(image, a, state)
    qemu_io(image, "write -P 0x77 20M 1M")
    first_b = run_cycle(image, b, state)
    assert first_b["mode"] == "full"
    qemu_io(image, "write -P 0x78 30M 1M")
    second_a = run_cycle(image, a, state)
    assert second_a["mode"] == "incremental" and second_a["bytes_total"] == 2 * MIB  # both writes
    assert len(kvm.bitmaps(str(image))) == 2
    raw = as_raw(image, tmp_path / "e.raw")
    assert sha256(raw) == sha256(a)


def test_cli_kvm_sync(image: Path, tmp_path: Path) -> None:
    conf = tmp_path / "hamal.conf"
    conf.write_text(f"[DEFAULT]\nhamal_lib_dir = {tmp_path}/lib\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hamal",
            "--config",
            str(conf),
            "kvm",
            "sync",
            str(image),
            str(tmp_path / "t.raw"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "full"
    assert list((tmp_path / "lib" / "kvm").glob("*.json"))
    r = subprocess.run(
        [sys.executable, "-m", "hamal", "kvm", "sync", str(tmp_path / "none.qcow2"), "x.raw"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "no such qcow2 image" in r.stderr


def test_a_bitmap_left_in_use_by_a_crashed_writer_means_a_full_sync_that_succeeds(
    image: Path, tmp_path: Path
) -> None:
    target, state = tmp_path / "target.raw", tmp_path / "state"
    first = run_cycle(image, target, state)
    # A writer killed while the image is open leaves the cursor bitmap marked in use.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 40M 1M", "-c", "sigraise 9", str(image)],
        capture_output=True,
    )
    assert "in-use" in kvm.bitmaps(str(image))[first["bitmap"]]
    second = run_cycle(image, target, state)
    assert second["mode"] == "full"
    assert list(kvm.bitmaps(str(image))) == [second["bitmap"]], "the stale bitmap is gone, once"
    assert sha256(as_raw(image, tmp_path / "f.raw")) == sha256(target)
    conf = tmp_path / "hamal.conf"
    conf.write_text(f"[DEFAULT]\nhamal_lib_dir = {tmp_path}/lib\n")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x9a 41M 1M", "-c", "sigraise 9", str(image)],
        capture_output=True,
    )
    r = run_hamal("--config", str(conf), "kvm", "sync", str(image), str(tmp_path / "cli.raw"), "--full")
    assert r.code == 0, r.err


def test_an_empty_qcow2_syncs_as_the_empty_disk_it_is(tmp_path: Path) -> None:
    img = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "0"], check=True)
    target, state = tmp_path / "t.raw", tmp_path / "state"
    s = run_cycle(img, target, state)
    assert s["size"] == 0 and target.stat().st_size == 0
    again = run_cycle(img, target, state)
    assert again["bytes_total"] == 0
