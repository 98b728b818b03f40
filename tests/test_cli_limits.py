"""What users and scripts hit first: signals and exit codes, checked numbers, inputs that are
not disks, --config, streamed JSON progress and an honest --bwlimit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_CONF, MIB, make_image, one_error_line, run_hamal
from nbd_servers import Server

ENV = {**os.environ, "HAMAL_CONF": str(DEFAULT_CONF)}


def hamal(*args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hamal", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def started(p: subprocess.Popen[str], path: Path, size: int) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.stat().st_size > size):
        assert p.poll() is None and time.monotonic() < deadline, "the sync did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # inside its paced waits


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
@pytest.mark.parametrize("bwlimit", ["1M", "1K"])
def test_signals_stop_a_sync_within_a_second(
    tmp_path: Path, sig: int, code: int, word: str, bwlimit: str
) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    journal = Path(f"{dst}.hamal-journal")
    make_image(src, 32 * MIB, seed=1, fill=1.0)
    args = ("--bwlimit", bwlimit, "--chunk-size", "64K", "--queue-depth", "1", "--fsync-period", "0.1")
    p = hamal("sync", str(src), str(dst), *args, "--no-progress")
    # At 1M chunks are journaled soon; at 1K the first 64 KiB takes a minute.
    started(p, journal if bwlimit == "1M" else dst, 100 if bwlimit == "1M" else 0)
    t0 = time.monotonic()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == code, err
    assert took < 1.0, f"took {took:.2f} s to stop"
    assert f"hamal: {word} (finished chunks are journaled; rerun to resume)" in err
    if bwlimit == "1M":
        assert journal.exists(), "the journal is kept"
    else:
        assert not journal.exists() and not dst.exists(), "nothing was written, so nothing is left"


def test_a_long_verify_stops_on_ctrl_c(tmp_path: Path, servers, sockdir) -> None:
    a = tmp_path / "a.raw"
    make_image(a, 64 * MIB, seed=2, fill=1.0)
    # Each read of the export takes 200 ms: the whole verify would take over 3 s.
    slow = [
        "nbdkit",
        "-f",
        "-U",
        str(sockdir / "slow.sock"),
        "--filter=delay",
        "file",
        f"file={a}",
        "delay-read=200ms",
    ]
    server = servers(Server(slow, sockdir / "slow.sock"))
    p = hamal("verify", server.uri, str(a))
    time.sleep(0.5)
    assert p.poll() is None, "the verify is still running"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.monotonic() - t0 < 1.5, err
    assert err.strip().splitlines()[-1] == "hamal: interrupted", err
    assert "journal" not in err, "nothing about journals: verify keeps none"


NUMBERS = [
    ("--readers", "-1", "use 1 to 64"),
    ("--readers", "65", "use 1 to 64"),
    ("--writers", "0", "use 1 to 64"),
    ("--queue-depth", "100000", "use 1 to 256"),
    ("--release-cpu-time", "-5", "use 0 to 10000"),
    ("--bwlimit", "1", "use 1K to 1T"),
    ("--chunk-size", "1", "use 4K to 256M"),
    ("--memory-budget", "1K", "use 8M to 1T"),
    ("--fsync-period", "0", "use 0.05 to 3600"),
    ("--readers", "two", "'two' is not a whole number"),
]


@pytest.mark.parametrize(("option", "value", "said"), NUMBERS)
def test_numbers_out_of_range_are_one_line_and_exit_2(
    tmp_path: Path, option: str, value: str, said: str
) -> None:
    r = run_hamal("sync", "a.raw", str(tmp_path / "b.raw"), f"{option}={value}")
    assert r.code == 2
    line = one_error_line(r.err)
    assert option in line and said in line, line
    assert "Traceback" not in r.err and "..=" not in r.err


def test_inputs_that_are_not_disks_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source, what in (
        (fifo, "a FIFO (named pipe)"),
        (tmp_path, "a directory"),
        (Path("/dev/null"), "a character device"),
    ):
        r = run_hamal("sync", str(source), str(tmp_path / "out.raw"), timeout=20)
        line = one_error_line(r.err)
        assert r.code == 1 and f"is {what}, not a disk" in line, line


def test_config_given_explicitly_must_exist_and_keys_once(tmp_path: Path) -> None:
    r = run_hamal("--config", str(tmp_path / "nope.conf"), "config", "check")
    assert r.code == 1 and "no such file" in one_error_line(r.err)
    conf = tmp_path / "hamal.conf"
    conf.write_text("[period]\ninterval = 5\n[s3]\nregion = x\n[period]\ninterval = 9\n")
    r = run_hamal("--config", str(conf), "config", "check")
    assert r.code == 1 and "[period] interval is set twice, on lines 2 and 6" in one_error_line(r.err)


def test_json_lines_stream_progress_and_bwlimit_holds_from_the_first_second(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make_image(src, 40 * MIB, seed=3, fill=1.0)
    rate = 8 * MIB
    p = hamal("sync", str(src), str(dst), "--bwlimit", "8M", "--json-lines", "--chunk-size", "1M")
    events = []
    assert p.stdout is not None
    for line in p.stdout:
        events.append(json.loads(line))
    assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 6 and events[-1]["event"] == "summary"
    assert events[-1]["bytes_total"] == 40 * MIB
    for e in progress:
        if e["elapsed_s"] >= 1.0:
            done = e["bytes_done"] + e["bytes_resumed"]
            assert done <= 1.05 * rate * e["elapsed_s"], f"{done} bytes after {e['elapsed_s']:.2f} s"
