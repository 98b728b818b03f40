"""Every bad input ends in one clear line, a non-zero exit, and an untouched target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import MIB, one_error_line, run_hamal, sha256


def test_missing_source(tmp_path: Path) -> None:
    r = run_hamal("sync", str(tmp_path / "nope.raw"), str(tmp_path / "t.raw"))
    assert r.code == 1
    line = one_error_line(r.err)
    assert "nope.raw" in line and "cannot open" in line
    assert not (tmp_path / "t.raw").exists()


def test_unreadable_source(image: Path, tmp_path: Path) -> None:
    image.chmod(0)
    # Root reads any file; without CAP_DAC_OVERRIDE it is held to the mode like anyone else.
    wrap = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), wrap=wrap)
    assert r.code == 1
    line = one_error_line(r.err)
    assert "Permission denied" in line and str(image) in line


def test_unreadable_source_directory(tmp_path: Path) -> None:
    # A directory cannot be a disk, whoever runs the test.
    r = run_hamal("sync", str(tmp_path), str(tmp_path / "t.raw"))
    assert r.code == 1
    assert "is a directory, not a disk" in one_error_line(r.err)


def test_target_smaller_than_source(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "small.raw"
    target.write_bytes(b"keep" * 1024)
    before = sha256(target)
    r = run_hamal("sync", str(image), str(target))
    assert r.code == 1
    line = one_error_line(r.err)
    assert "smaller than the source" in line and str(target) in line
    assert sha256(target) == before
    assert not Path(str(target) + ".hamal-journal").exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json", "not valid JSON"),
        ('{"offset": 0}', "expected a JSON list"),
        ("[[0, 4096], [-4096, 10]]", "entry 1 [-4096, 10] has a negative"),
        ("[[0, 8192], [4096, 8192]]", "overlap"),
        (f"[[{63 * MIB}, {2 * MIB}]]", "past the end of the disk"),
        ("[[0]]", "expected [offset, length]"),
    ],
)
def test_malformed_changed_list(image: Path, tmp_path: Path, content: str, expected: str) -> None:
    target = tmp_path / "t.raw"
    assert run_hamal("sync", str(image), str(target)).code == 0
    before = sha256(target)
    changed = tmp_path / "changed.json"
    changed.write_text(content)
    r = run_hamal("sync", str(image), str(target), "--changed", str(changed))
    assert r.code == 1
    line = one_error_line(r.err)
    assert str(changed) in line and expected in line, line
    assert sha256(target) == before


def test_missing_changed_file(image: Path, tmp_path: Path) -> None:
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--changed", str(tmp_path / "none.json"))
    assert r.code == 1 and "none.json" in one_error_line(r.err)


def test_unsupported_uri_scheme(image: Path) -> None:
    r = run_hamal("sync", str(image), "gs://bucket/x")
    assert r.code == 1 and "unsupported URI scheme 'gs'" in one_error_line(r.err)


def test_bad_engine_options(image: Path, tmp_path: Path) -> None:
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--chunk-size", "1000")
    assert r.code == 2 and "--chunk-size: 1000 is out of range: use 4K to 256M" in one_error_line(r.err)
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--chunk-size", "5000")
    assert r.code == 1 and "not a multiple of 4096" in one_error_line(r.err)
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--readers", "40")
    assert r.code == 1 and "max_pre_disk_readers_count" in one_error_line(r.err)
    r = run_hamal("verify", str(image), str(image), "--chunk-size", "1000")
    assert r.code == 2 and "out of range" in one_error_line(r.err)
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--chunk-size", "4X")
    assert r.code == 2 and "not a size" in r.err


def test_source_equals_target(image: Path) -> None:
    r = run_hamal("sync", str(image), str(image))
    assert r.code == 1 and "same file" in one_error_line(r.err)


def test_json_summary_on_success_only(image: Path, tmp_path: Path) -> None:
    r = run_hamal("sync", str(image), str(tmp_path / "t.raw"), "--json")
    assert json.loads(r.out)["disk_id"] == str(tmp_path / "t.raw")
