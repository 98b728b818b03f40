"""``hamal.conf`` through the Python face and ``hamal config check``."""

from __future__ import annotations

from pathlib import Path

import hamal
import pytest
from conftest import run_hamal

SECRET = "315d65ca-ef28-4e63-ad72-1260a91adf23"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hamal.conf"
    p.write_text(text)
    return p


def test_typed_values_and_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, f"[mass]\nauth_key = {SECRET}\n[data_sync_v2]\npre_disk_readers_count = 4\n")
    cfg = hamal.load_config(str(p))
    d = cfg.as_dict()
    assert d["data_sync_v2"]["pre_disk_readers_count"] == 4
    assert d["data_sync_v2"]["fsync_period_frequency"] == 3
    assert d["DEFAULT"]["debug"] is False and d["mass"]["enable_heartbeat_msg"] is True
    assert d["mass"]["auth_key"] == SECRET
    assert ("mass", "auth_key") in cfg.secret_keys()
    assert SECRET not in cfg.render()


def test_config_check_prints_masked(tmp_path: Path) -> None:
    p = write(tmp_path, f"[mass]\nauth_key = {SECRET}\n")
    r = run_hamal("config", "check", str(p))
    assert r.code == 0, r.err
    assert SECRET not in r.out + r.err
    assert "auth_key = ********" in r.out and "[data_sync_v2]" in r.out


def test_env_and_option_choose_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[period]\ninterval = 30\n")
    assert "interval = 30" in run_hamal("config", "check", env={"HAMAL_CONF": str(p)}).out
    assert "interval = 30" in run_hamal("--config", str(p), "config", "check").out


def test_missing_file_means_defaults_said_once(tmp_path: Path) -> None:
    r = run_hamal("config", "check", str(tmp_path / "none.conf"))
    assert r.code == 0
    assert r.err.count("not found; using the default configuration") == 1
    assert "interval = 60" in r.out


def test_unknown_key_warns(tmp_path: Path) -> None:
    r = run_hamal("config", "check", str(write(tmp_path, "[period]\nintervall = 5\n")))
    assert r.code == 0 and "unknown key 'intervall' in [period]" in r.err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[DEFAULT]\ndebug = perhaps\n", "[DEFAULT] debug = 'perhaps': expected a boolean"),
        ("[period]\ninterval = -1\n", "[period] interval = '-1': expected a whole number"),
        ("[period]\ninterval = 999999\n", "expected a whole number from 1 to 86400"),
        ("[mass]\nmass_endpoint = 192.168.7.141\n", "expected an http:// or https:// URL"),
        ("[fusion_compute]\nlocal_host_ip = host\n", "expected an IP address or empty"),
        ("[DEFAULT]\nlog_rotation_type = weekly\n", "expected one of: size"),
        ("[data_sync_v2]\nparallel_sync_disks_count = 20\n", "must be <= max_parallel_sync_disks_count = 16"),
        ("this is not ini [\n", "not a valid INI file"),
    ],
)
def test_bad_values_name_everything(tmp_path: Path, text: str, expected: str) -> None:
    p = write(tmp_path, text)
    r = run_hamal("config", "check", str(p))
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith(f"hamal: error: {p}") and expected in lines[0], lines[0]
    with pytest.raises(hamal.ConfigError):
        hamal.load_config(str(p))


def test_sync_reads_readers_and_cadence_from_config(image: Path, tmp_path: Path) -> None:
    p = write(tmp_path, "[data_sync_v2]\npre_disk_readers_count = 17\nmax_pre_disk_readers_count = 16\n")
    r = run_hamal("--config", str(p), "sync", str(image), str(tmp_path / "t.raw"))
    assert r.code == 1 and "pre_disk_readers_count = 17 must be <=" in r.err
