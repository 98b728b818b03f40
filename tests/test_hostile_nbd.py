"""A lying NBD server (tests/hostile_nbd.py) must never give a version with wrong data, hang a
sync past its deadline, or make hamal allocate what the server merely claims."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import MIB, make_image, run_hamal, sha256, wait_until
from hostile_nbd import LIES, HostileNbd

SIZE = 8 * MIB


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "disk.raw"
    make_image(img, SIZE, seed=40, fill=0.75)
    return img


def versions(store: str) -> list:
    r = run_hamal("versions", store, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["versions"]


@pytest.mark.parametrize("lie", [lie for lie, want in LIES.items() if want == "fail"])
def test_a_lie_fails_the_sync_and_commits_nothing(tmp_path, image, lie) -> None:
    server = HostileNbd(image, tmp_path / "s.sock", lie).start()
    try:
        store = f"dir:{tmp_path / 'store'}"
        started = time.monotonic()
        r = run_hamal("sync", server.uri, store, "--disk", "d0", timeout=60)
        assert r.code != 0, f"{lie}: exit 0\n{r.err}"
        assert time.monotonic() - started < 30, f"{lie}: took {time.monotonic() - started:.0f} s"
        assert "Traceback" not in r.err and "panicked" not in r.err, r.err
        committed = versions(store) if (tmp_path / "store").exists() else []
        assert committed == [], f"{lie}: a version was committed"
        # A raw file target gets no claim of success either.
        r = run_hamal("sync", server.uri, str(tmp_path / "out.raw"), timeout=60)
        assert r.code != 0, f"{lie}: exit 0 into a file\n{r.err}"
    finally:
        server.stop()


def test_the_errors_say_what_the_server_did(tmp_path, image) -> None:
    cases = {
        "half-data": "answered 4096 of the 8192 bytes",
        "no-export-info": "did not say the export's size",
        "huge-size": "more than the 1125899906842624 hamal takes",
        "overlap": "chunks overlap",
        "huge-error-chunk": "error chunk of 2147483648 bytes",
    }
    for lie, words in cases.items():
        server = HostileNbd(image, tmp_path / f"{lie}.sock", lie)
        server.max_block = 8192  # reads of 8 KiB: the half the server answers is 4 KiB
        server.start()
        try:
            r = run_hamal("sync", server.uri, str(tmp_path / f"{lie}.raw"), timeout=60)
        finally:
            server.stop()
        assert r.code != 0 and words in r.err, f"{lie}: {r.err}"


@pytest.mark.parametrize("lie", [lie for lie, want in LIES.items() if want == "serve"])
def test_an_awkward_but_honest_server_gives_the_right_bytes(tmp_path, image, lie) -> None:
    server = HostileNbd(image, tmp_path / "s.sock", lie).start()
    store = f"dir:{tmp_path / 'store'}"
    try:
        started = time.monotonic()
        r = run_hamal("sync", server.uri, store, "--disk", "d0", "--json", timeout=120)
        took = time.monotonic() - started
    finally:
        server.stop()
    assert r.code == 0, r.err
    assert took < 60, f"{lie}: {took:.0f} s"
    if lie == "small-max-block":
        assert 0 < server.largest_read <= 4096
    restored = tmp_path / "restored.raw"
    assert run_hamal("restore", store, "--disk", "d0", str(restored)).code == 0
    assert sha256(restored) == sha256(image)


def test_sigterm_ends_a_sync_blocked_on_a_silent_server_within_seconds(tmp_path, image) -> None:
    server = HostileNbd(image, tmp_path / "s.sock", "silent").start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hamal", "sync", server.uri, str(tmp_path / "out.raw")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: server.reads > 0, "the first read")
        time.sleep(1)  # well inside the read, with nothing coming
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode != 0
    assert took < 3, f"SIGTERM took {took:.1f} s: {err}"
