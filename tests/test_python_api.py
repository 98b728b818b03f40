"""The Python face: job handle, cancellation, exceptions, logging bridge, stub."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hamal
import pytest
from conftest import DEFAULT_CONF, MIB, make_image, sha256
from hamal import _native, sync


def defaults() -> _native.Config:
    return hamal.load_config(str(DEFAULT_CONF))


def test_job_handle_progress_and_wait(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.raw"
    job = sync.start([sync.disk(str(image), str(target), disk_id="d0")], defaults())
    summaries = job.wait()
    assert job.finished
    assert summaries[0]["disk_id"] == "d0"
    p = job.progress()
    assert p["finished"] and p["disks"][0]["state"] == "done"
    assert p["bytes_done"] == p["bytes_total"] > 0
    assert job.results()[0]["summary"]["bytes_total"] == p["bytes_total"]
    assert sha256(image) == sha256(target)


def test_wait_timeout_progress_and_cancel(tmp_path: Path) -> None:
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    make_image(src, 128 * MIB, seed=3, fill=1.0)
    opts = sync.SyncOptions(chunk_size=MIB, bwlimit_bps=16 * MIB, fsync_period_s=0.1)
    job = sync.start([sync.disk(str(src), str(dst))], defaults(), opts)
    t0 = time.monotonic()
    assert job.wait(timeout=0.3) is None  # still running
    assert 0.25 < time.monotonic() - t0 < 5
    # The first chunks may take a moment on a loaded machine; the whole run takes about 8 s.
    while (p := job.progress())["bytes_done"] == 0 and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not p["finished"] and 0 < p["bytes_done"] < p["bytes_total"]
    assert p["rate_bps"] > 0 and p["eta_s"] is not None
    job.cancel()
    with pytest.raises(hamal.SyncCancelled):
        job.wait(timeout=10)
    assert job.results()[0]["error_kind"] == "SyncCancelled"
    assert job.progress()["disks"][0]["state"] == "cancelled"
    # What was done is journaled: a rerun resumes and finishes identical.
    (s,) = sync.start([sync.disk(str(src), str(dst))], defaults(), sync.SyncOptions(chunk_size=MIB)).wait()
    assert s["bytes_resumed"] > 0
    assert sha256(src) == sha256(dst)


def test_errors_form_one_tree(tmp_path: Path) -> None:
    for cls in (
        hamal.ConfigError,
        hamal.PlanError,
        hamal.SourceError,
        hamal.TargetError,
        hamal.JournalError,
        hamal.MismatchError,
        hamal.SyncCancelled,
        hamal.InternalError,
    ):
        assert issubclass(cls, hamal.HamalError)
    job = sync.start([sync.disk(str(tmp_path / "missing.raw"), str(tmp_path / "t.raw"))], defaults())
    with pytest.raises(hamal.SourceError, match="missing.raw"):
        job.wait()
    with pytest.raises(hamal.PlanError, match="chunk size"):
        _native.start_sync([sync.disk("a", "b")], chunk_size=1000)
    with pytest.raises(hamal.PlanError, match="missing key 'target'"):
        _native.start_sync([{"source": "a"}])


def test_unknown_plan_keys_are_refused() -> None:
    plan = sync.disk("a", "b")
    del plan["changed"]
    plan["changes"] = [[0, 4096]]  # a typo must not turn an incremental into a full sync
    with pytest.raises(hamal.PlanError, match="disk 0: unknown key 'changes'"):
        _native.start_sync([plan])
    with pytest.raises(TypeError):
        _native.start_sync([sync.disk("a", "b")], chunk_sise=1 << 20)  # type: ignore[call-arg]


def test_exceptions_live_in_hamal_and_pickle(tmp_path: Path) -> None:
    import pickle

    job = sync.start([sync.disk(str(tmp_path / "missing.raw"), str(tmp_path / "t.raw"))], defaults())
    with pytest.raises(hamal.SourceError) as e:
        job.wait()
    assert type(e.value).__module__ == "hamal.errors"
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is hamal.SourceError and str(again) == str(e.value)
    assert not hasattr(_native, "SourceError"), "defined once, in hamal.errors"


def test_the_config_object_goes_to_the_engine_as_it_is(image: Path, tmp_path: Path) -> None:
    conf = tmp_path / "hamal.conf"
    conf.write_text("[data_sync_v2]\npre_disk_readers_count = 3\nmax_pre_disk_readers_count = 3\n")
    cfg = hamal.load_config(str(conf))
    with pytest.raises(
        hamal.PlanError, match="readers = 4 exceeds .data_sync_v2. max_pre_disk_readers_count = 3"
    ):
        _native.start_sync([sync.disk(str(image), str(tmp_path / "t.raw"))], cfg, readers=4)
    (s,) = _native.start_sync([sync.disk(str(image), str(tmp_path / "t.raw"))], cfg).wait()
    assert s["bytes_total"] > 0


def test_a_job_is_a_context_manager_that_cancels_on_exit(tmp_path: Path) -> None:
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    make_image(src, 64 * MIB, seed=4, fill=1.0)
    with pytest.raises(RuntimeError, match="leaving early"):
        with sync.start(
            [sync.disk(str(src), str(dst))], defaults(), sync.SyncOptions(bwlimit_bps=4 * MIB)
        ) as job:
            raise RuntimeError("leaving early")
    assert job.finished and job.progress()["disks"][0]["state"] == "cancelled"


def test_several_disks_one_failing(image: Path, tmp_path: Path) -> None:
    disks = [
        sync.disk(str(image), str(tmp_path / "ok.raw"), disk_id="ok"),
        sync.disk(str(tmp_path / "missing.raw"), str(tmp_path / "bad.raw"), disk_id="bad"),
    ]
    job = sync.start(disks, defaults(), sync.SyncOptions(parallel_disks=2))
    with pytest.raises(hamal.SourceError):
        job.wait()
    by_id = {r["disk_id"]: r for r in job.results()}
    assert by_id["ok"]["state"] == "done" and by_id["bad"]["state"] == "failed"
    assert sha256(image) == sha256(tmp_path / "ok.raw")


def test_engine_events_reach_python_logging(
    image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hamal"):
        sync.start([sync.disk(str(image), str(tmp_path / "t.raw"), disk_id="logged")], defaults()).wait()
    records = [r for r in caplog.records if r.name.startswith("hamal.hamal_core")]
    assert any("disk synced" in r.getMessage() for r in records), [r.getMessage() for r in caplog.records]


def test_stub_matches_the_compiled_module() -> None:
    if (
        shutil.which("stubtest") is None
        and subprocess.run([sys.executable, "-c", "import mypy.stubtest"], capture_output=True).returncode
        != 0
    ):
        pytest.fail("mypy is not installed: install the test extra (pip install .[test])")
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "hamal._native"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
