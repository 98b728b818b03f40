"""Chunk store on a real S3 server (radosgw): versions, dedup, crashes, damage, keys, prune."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ceph_cluster import ACCESS_KEY, SECRET_KEY
from conftest import MIB, make_image, one_error_line, run_hamal, sha256
from faulty_proxy import FaultyProxy
from s3_server import S3Env


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def changed_file(tmp: Path, pairs: list[tuple[int, int]]) -> str:
    p = tmp / f"changed-{len(pairs)}-{time.monotonic_ns()}.json"
    p.write_text(json.dumps(pairs))
    return str(p)


def sync(s3: S3Env, src: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    r = run_hamal("sync", str(src), s3.store, "--disk", "vm-1", "--json", *extra, env=env or s3.env())
    assert r.code == 0, r.err
    return json.loads(r.out)["version"]


def restore(s3: S3Env, version: str, out: Path, *extra: str) -> None:
    r = run_hamal("restore", s3.store, str(out), "--disk", "vm-1", "--version", version, *extra, env=s3.env())
    assert r.code == 0, r.err


def test_versions_restore_identical_dedup_and_bucket_alone(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 48 * MIB, seed=3)
    v1 = sync(s3, src)
    want1 = sha256(src)
    chunks_v1 = set(s3.keys("chunks/"))
    assert chunks_v1, "chunks were uploaded"

    # Unchanged disk, empty change list: nothing new but the version record.
    v2 = sync(s3, src, "--changed", changed_file(tmp_path, []))
    assert set(s3.keys("chunks/")) == chunks_v1

    # A full re-sync of the same content uploads no chunk either (dedup).
    v3 = sync(s3, src)
    assert set(s3.keys("chunks/")) == chunks_v1

    write_at(src, 5 * MIB + 123, b"changed" * 1000)
    write_at(src, 40 * MIB, bytes(MIB))  # data -> zeros
    v4 = sync(s3, src, "--changed", changed_file(tmp_path, [(5 * MIB, 8192), (40 * MIB, MIB)]))
    want4 = sha256(src)
    assert len(set(s3.keys("chunks/")) - chunks_v1) == 1, "one changed chunk uploaded"

    for v, want in [(v1, want1), (v2, want1), (v3, want1), (v4, want4)]:
        out = tmp_path / f"restored-{v}.raw"
        restore(s3, v, out)
        assert sha256(out) == want, v

    # Another host with an empty hamal_lib_dir sees every version from the bucket alone.
    r = run_hamal("versions", s3.store, "--disk", "vm-1", "--json", env=s3.env(s3.conf("other.conf")))
    assert r.code == 0, r.err
    listed = json.loads(r.out)
    assert [v["version"] for v in listed["versions"]] == [v1, v2, v3, v4]
    assert listed["versions"][3]["parent"] == v3
    r = run_hamal("verify", s3.store, "--deep", env=s3.env())
    assert r.code == 0, r.err
    assert "4 versions" in r.out


def test_server_killed_mid_sync_commits_nothing_and_rerun_completes(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    make_image(src, 192 * MIB, seed=5, fill=1.0)
    args = [sys.executable, "-m", "hamal", "sync", str(src), s3.store, "--disk", "vm-1", "--bwlimit", "24M"]
    p = subprocess.Popen(
        args, env={**__import__("os").environ, **s3.env()}, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(s3.keys("chunks/")) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(s3.keys("chunks/")) >= 3, "the sync started uploading"
        s3.cluster.kill_rgw()
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 1, err
    assert "hamal: error: store s3://" in err, err
    s3.cluster.start_rgw()
    assert s3.keys("versions/") == [], "no version for incomplete data"

    r = run_hamal("sync", str(src), s3.store, "--disk", "vm-1", "--json", env=s3.env())
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["bytes_resumed"] > 0, "chunks stored before the crash were not read again"
    out = tmp_path / "restored.raw"
    restore(s3, summary["version"], out)
    assert sha256(out) == sha256(src)


def test_damaged_and_missing_chunks_are_reported_with_offsets(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 16 * MIB, seed=7, fill=1.0)
    v = sync(s3, src)
    keys = sorted(s3.keys("chunks/"))
    assert len(keys) == 4
    obj = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=keys[0])["Body"].read())
    obj[-1] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=keys[0], Body=bytes(obj))
    s3.client.delete_object(Bucket=s3.bucket, Key=keys[1])

    r = run_hamal("verify", s3.store, env=s3.env())
    assert r.code == 3, r.err
    assert r.err.count("is missing") == 1, r.err
    r = run_hamal("verify", s3.store, "--deep", env=s3.env())
    assert r.code == 3, r.err
    assert "is missing" in r.err and "is damaged" in r.err, r.err
    assert r.err.count("chunk at disk offset") == 2, r.err

    r = run_hamal("restore", s3.store, str(tmp_path / "out.raw"), "--disk", "vm-1", env=s3.env())
    assert r.code == 1
    line = one_error_line(r.err)
    assert f"version {v}" in line and "chunk at disk offset" in line, line


def test_encrypted_store_and_wrong_key(s3: S3Env, tmp_path: Path) -> None:
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_bytes(bytes(range(32)))
    wrong.write_text("ab" * 32)
    src = tmp_path / "disk.raw"
    make_image(src, 16 * MIB, seed=9)
    v = sync(s3, src, "--key-file", str(key))
    out = tmp_path / "out.raw"
    restore(s3, v, out, "--key-file", str(key))
    assert sha256(out) == sha256(src)
    r = run_hamal("restore", s3.store, str(out), "--disk", "vm-1", "--key-file", str(wrong), env=s3.env())
    assert r.code == 1
    assert f"encryption key file {wrong} is not this store's key" in one_error_line(r.err)
    r = run_hamal("restore", s3.store, str(out), "--disk", "vm-1", env=s3.env())
    assert "the store is encrypted" in one_error_line(r.err)


def test_prune_keeps_restorable_versions_and_collects(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 16 * MIB, seed=11, fill=1.0)
    sync(s3, src)
    sums = []
    for i in range(3):
        write_at(src, i * 4 * MIB, bytes([i + 1]) * MIB)
        v = sync(s3, src, "--changed", changed_file(tmp_path, [(i * 4 * MIB, MIB)]))
        sums.append((v, sha256(src)))
    before = len(s3.keys("chunks/"))
    r = run_hamal("prune", s3.store, "--keep", "2", "--json", env=s3.env())
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert len(report["removed_versions"]) == 2 and report["gc_skipped"] is None
    assert report["removed_chunks"] >= 1
    assert len(s3.keys("chunks/")) == before - report["removed_chunks"]
    for v, want in sums[1:]:
        out = tmp_path / f"p-{v}.raw"
        restore(s3, v, out)
        assert sha256(out) == want
    r = run_hamal("prune", s3.store, "--keep", "130", env=s3.env())
    assert r.code == 2 and "130 is out of range: use 1 to 129" in one_error_line(r.err)


def test_records_stay_local_when_upload_is_off(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 8 * MIB, seed=13)
    conf = s3.conf("local.conf", extra="upload_metadata_to_oss = False\n")
    conf.write_text(conf.read_text().replace("upload_metadata_to_oss = True\n", ""))
    r = run_hamal("sync", str(src), s3.store, "--disk", "vm-1", "--json", env=s3.env(conf))
    assert r.code == 0, r.err
    assert "the bucket alone cannot be restored" in r.err, "the operator is told"
    v = json.loads(r.out)["version"]
    assert s3.keys("versions/") == []
    assert list((tmp_path / "lib-local.conf" / "snapshot_metadata").rglob(f"{v}.json"))
    r = run_hamal("versions", s3.store, "--json", env=s3.env(conf))
    assert [x["version"] for x in json.loads(r.out)["versions"]] == [v]


def test_bad_uri_credentials_and_bucket_are_clear(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 4 * MIB)
    r = run_hamal("sync", str(src), "s3://No_Such/x", "--disk", "d", env=s3.env())
    assert "bad store URI 's3://No_Such/x'" in one_error_line(r.err)
    bad = s3.conf("bad.conf", secret="not-the-secret-0000000000000000000000000")
    r = run_hamal("sync", str(src), s3.store, "--disk", "d", env=s3.env(bad))
    line = one_error_line(r.err)
    assert f"store {s3.store}: cannot read hamal-store.json" in line, line
    assert "SignatureDoesNotMatch" in line, line
    assert "not-the-secret" not in r.err + r.out and SECRET_KEY not in r.err + r.out
    r = run_hamal("sync", str(src), "s3://hamal-no-such-bucket/x", "--disk", "d", env=s3.env())
    assert "bucket 'hamal-no-such-bucket' does not exist" in one_error_line(r.err)
    r = run_hamal("config", "check", env=s3.env())
    assert "secret_access_key = ********" in r.out and SECRET_KEY not in r.out


def test_injected_5xx_and_resets_are_retried(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 24 * MIB, seed=17, fill=1.0)
    with FaultyProxy(s3.cluster.endpoint, every=4) as proxy:
        conf = s3.conf("proxy.conf")
        # Eight upload threads share the proxy's fault counter: one request may meet several
        # faults in a row, so it gets more than the fixture's two retries.
        text = conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint)
        conf.write_text(text.replace("max_retries = 2", "max_retries = 10"))
        r = run_hamal("sync", str(src), s3.store, "--disk", "vm-1", "--json", env=s3.env(conf))
        assert r.code == 0, r.err
        out = tmp_path / "out.raw"
        r = run_hamal("restore", s3.store, str(out), "--disk", "vm-1", env=s3.env(conf))
        assert r.code == 0, r.err
        assert proxy.faults["503"] >= 2 and proxy.faults["reset"] >= 2, proxy.faults
    assert sha256(out) == sha256(src)


def test_bodies_cut_short_are_fetched_again(s3: S3Env, tmp_path: Path) -> None:
    """A GET whose connection drops halfway through the body is sent again, and the object read
    again from its start: a restore streams bodies into reused buffers."""
    src = tmp_path / "disk.raw"
    make_image(src, 40 * MIB, seed=19, fill=0.8)
    r = run_hamal("sync", str(src), s3.store, "--disk", "cut", env=s3.env())
    assert r.code == 0, r.err
    with FaultyProxy(s3.cluster.endpoint, every=3, faults=("cut",)) as proxy:
        conf = s3.conf("cut.conf")
        text = conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint)
        conf.write_text(text.replace("max_retries = 2", "max_retries = 10"))
        out = tmp_path / "out.raw"
        r = run_hamal("restore", s3.store, str(out), "--disk", "cut", env=s3.env(conf))
        assert r.code == 0, r.err
        assert proxy.faults["cut"] >= 2, proxy.faults
    assert sha256(out) == sha256(src)


def test_verify_deep_reads_a_garbled_chunk_again_and_destroys_nothing(s3: S3Env, tmp_path: Path) -> None:
    """A chunk whose body arrives with a bit flipped is read again before it is called damaged:
    one bad answer must not quarantine a healthy chunk (which left every version unrestorable)."""
    src = tmp_path / "disk.raw"
    make_image(src, 24 * MIB, seed=23, fill=1.0)
    assert run_hamal("sync", str(src), s3.store, "--disk", "flip", env=s3.env()).code == 0
    with FaultyProxy(s3.cluster.endpoint, every=3, faults=("flip",)) as proxy:
        conf = s3.conf("flip.conf")
        conf.write_text(conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint))
        r = run_hamal("verify", s3.store, "--disk", "flip", "--deep", env=s3.env(conf))
        assert proxy.faults["flip"] >= 2, proxy.faults
        assert r.code == 0, r.err
        assert "garbled" in r.err
        # A restore through the same proxy reads a garbled chunk again too.
        out = tmp_path / "via-proxy.raw"
        r = run_hamal("restore", s3.store, str(out), "--disk", "flip", env=s3.env(conf))
        assert r.code == 0, r.err
        assert sha256(out) == sha256(src)
    out = tmp_path / "out.raw"
    assert run_hamal("restore", s3.store, str(out), "--disk", "flip", env=s3.env()).code == 0
    assert sha256(out) == sha256(src)


@pytest.mark.parametrize(
    ("lie", "words"),
    [("list-loop", "pagination loops"), ("list-foreign", "which is not under")],
)
def test_a_lying_listing_fails_at_once(s3: S3Env, tmp_path: Path, lie: str, words: str) -> None:
    """Pagination that never ends hung `versions` and `verify`; a key outside the prefix
    panicked. Both are now an error naming what the server did."""
    src = tmp_path / "disk.raw"
    make_image(src, 4 * MIB, seed=24, fill=1.0)
    assert run_hamal("sync", str(src), s3.store, "--disk", "d0", env=s3.env()).code == 0
    with FaultyProxy(s3.cluster.endpoint, every=1, faults=(lie,)) as proxy:
        conf = s3.conf(f"{lie}.conf")
        conf.write_text(conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint))
        for command in (["versions", s3.store], ["verify", s3.store, "--deep"]):
            r = run_hamal(*command, env=s3.env(conf), timeout=60)
            assert r.code not in (0, 3) and words in r.err, r.err
            assert "panicked" not in r.err, r.err
        assert proxy.faults[lie] >= 2


def test_a_put_acknowledged_but_not_stored_commits_nothing(s3: S3Env, tmp_path: Path) -> None:
    """A gateway that answers PUTs with success but keeps nothing: the sync fails before its
    version exists, and a rerun through an honest gateway stores everything."""
    src = tmp_path / "disk.raw"
    make_image(src, 16 * MIB, seed=25, fill=1.0)
    with FaultyProxy(s3.cluster.endpoint, every=1, faults=("drop-put",)) as proxy:
        conf = s3.conf("drop.conf")
        conf.write_text(conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint))
        r = run_hamal("sync", str(src), s3.store, "--disk", "d0", env=s3.env(conf))
        assert proxy.faults["drop-put"] >= 1, proxy.faults
    assert r.code != 0 and "did not keep what it acknowledged" in r.err, r.err
    listed = json.loads(run_hamal("versions", s3.store, "--json", env=s3.env()).out)["versions"]
    assert listed == []
    assert run_hamal("sync", str(src), s3.store, "--disk", "d0", env=s3.env()).code == 0
    out = tmp_path / "out.raw"
    assert run_hamal("restore", s3.store, str(out), "--disk", "d0", env=s3.env()).code == 0
    assert sha256(out) == sha256(src)


def test_retries_follow_the_status(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 16 * MIB, seed=18, fill=1.0)
    with FaultyProxy(s3.cluster.endpoint, every=3, faults=("429",)) as proxy:
        conf = s3.conf("slow.conf")
        text = conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint)
        conf.write_text(text.replace("max_retries = 2", "max_retries = 10"))
        r = run_hamal("sync", str(src), s3.store, "--disk", "d", env=s3.env(conf))
        assert r.code == 0, r.err
        assert proxy.faults["429"] >= 2, "429 Too Many Requests is retried"
    for status, word in (("400", "InvalidRequest"), ("403", "AccessDenied")):
        with FaultyProxy(s3.cluster.endpoint, every=1, faults=(status,)) as proxy:
            conf = s3.conf(f"f{status}.conf")
            conf.write_text(conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint))
            r = run_hamal("sync", str(src), s3.store, "--disk", f"d{status}", env=s3.env(conf))
            line = one_error_line(r.err)
            assert word in line, line
            assert proxy.requests == 1, f"a {status} answer is final, not retried ({proxy.requests} requests)"


def test_tls_failures_say_why(s3: S3Env, tmp_path: Path) -> None:
    from certs import Ca, self_signed_ca_true

    src = tmp_path / "disk.raw"
    make_image(src, 4 * MIB, seed=19, fill=1.0)
    ca, other = Ca(tmp_path), Ca(tmp_path, "another CA")
    good = ca.server("good")
    cases = [
        (good, ca.pem, None),
        (good, other.pem, "not signed by a CA this host trusts"),
        (
            ca.server("wrong-name", ip=None, dns="s3.example.org"),
            ca.pem,
            "is for s3.example.org but the server was reached as 127.0.0.1",
        ),
        (ca.server("expired", expired=True), ca.pem, "has expired"),
        (self_signed_ca_true(tmp_path), tmp_path / "self-signed.pem", "presents a CA certificate"),
    ]
    for i, (server, ca_file, why) in enumerate(cases):
        with FaultyProxy(s3.cluster.endpoint, every=0, tls=server) as proxy:
            conf = s3.conf(f"tls{i}.conf")
            text = conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint)
            conf.write_text(text.replace("[s3]\n", f"[s3]\nca_file = {ca_file}\n"))
            r = run_hamal("sync", str(src), s3.store, "--disk", f"t{i}", env=s3.env(conf))
            if why is None:
                assert r.code == 0, r.err
                continue
            line = one_error_line(r.err)
            assert why in line and f"[s3] ca_file = {ca_file}" in line and proxy.endpoint in line, line


def test_bodies_are_signed_unless_tls_guards_them(s3: S3Env, tmp_path: Path) -> None:
    """Over plain HTTP every PUT body's SHA-256 is signed (the server checks it: a body damaged
    on the way is refused); over HTTPS, TLS guards it and the hash is skipped on both sides."""
    from certs import Ca

    src = tmp_path / "disk.raw"
    make_image(src, 12 * MIB, seed=23, fill=0.7)
    ca = Ca(tmp_path)
    for tls, expect in ((None, "sha256"), (ca.server("s3"), "unsigned")):
        with FaultyProxy(s3.cluster.endpoint, every=0, tls=tls) as proxy:
            conf = s3.conf(f"{expect}.conf")
            text = conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint)
            conf.write_text(text.replace("[s3]\n", f"[s3]\nca_file = {ca.pem}\n"))
            r = run_hamal("sync", str(src), s3.store, "--disk", expect, env=s3.env(conf))
            assert r.code == 0, r.err
            assert set(proxy.payloads) == {expect} and proxy.payloads[expect] >= 3, proxy.payloads
            out = tmp_path / f"{expect}.raw"
            r = run_hamal("restore", s3.store, str(out), "--disk", expect, env=s3.env(conf))
            assert r.code == 0, r.err
            assert out.read_bytes() == src.read_bytes()


def test_an_incremental_and_a_restore_read_one_version_record(s3: S3Env, tmp_path: Path) -> None:
    """However many versions a disk has, an incremental reads the newest record alone and a
    restore the one it restores: a listing and one GET, not a GET per version."""
    src = tmp_path / "disk.raw"
    make_image(src, 8 * MIB, seed=31, fill=0.5)
    first = sync(s3, src)
    empty = changed_file(tmp_path, [])
    with FaultyProxy(s3.cluster.endpoint, every=0) as proxy:
        conf = s3.conf("counted.conf")
        conf.write_text(conf.read_text().replace(s3.cluster.endpoint, proxy.endpoint))
        for _ in range(6):
            proxy.calls.clear()
            sync(s3, src, "--changed", empty, env=s3.env(conf))
            assert proxy.calls[("GET", "versions")] == 1, proxy.calls
        for version in (first, None):
            proxy.calls.clear()
            out = tmp_path / f"restored-{version}.raw"
            pick = ["--version", version] if version else []
            r = run_hamal("restore", s3.store, str(out), "--disk", "vm-1", *pick, env=s3.env(conf))
            assert r.code == 0, r.err
            assert sha256(out) == sha256(src)
            assert proxy.calls[("GET", "versions")] == 1, proxy.calls


def test_credentials_from_the_environment(s3: S3Env, tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    make_image(src, 4 * MIB)
    conf = s3.conf("env.conf")
    text = conf.read_text().replace(f"access_key_id = {ACCESS_KEY}\n", "")
    conf.write_text(text.replace(f"secret_access_key = {SECRET_KEY}\n", ""))
    unset = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    r = run_hamal("sync", str(src), s3.store, "--disk", "d", env={**s3.env(conf), **unset})
    assert "no S3 credentials" in one_error_line(r.err)
    aws = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    r = run_hamal("sync", str(src), s3.store, "--disk", "d", env={**s3.env(conf), **aws})
    assert r.code == 0, r.err
