"""pytest fixtures for the chunk-store tests on a real S3 server (radosgw of a throw-away Ceph)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ceph_cluster import ACCESS_KEY, SECRET_KEY, CephCluster, missing_programs

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    missing = missing_programs()
    if missing:
        pytest.skip(f"Ceph is not installed (missing {', '.join(missing)}); tools/test installs it")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class S3Env:
    cluster: CephCluster
    bucket: str
    client: Any  # a boto3 S3 client
    root: Path

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}/hamal"

    def conf(self, name: str = "hamal.conf", *, secret: str = SECRET_KEY, extra: str = "") -> Path:
        """A hamal.conf pointing at the server, with version records uploaded to the bucket and
        few retries so that failures show quickly."""
        lib = self.root / f"lib-{name}"
        p = self.root / name
        p.write_text(
            f"[DEFAULT]\nhamal_lib_dir = {lib}\n"
            f"[s3]\nendpoint = {self.cluster.endpoint}\naccess_key_id = {ACCESS_KEY}\n"
            f"secret_access_key = {secret}\nmax_retries = 2\nrequest_timeout = 10\n"
            f"[sync]\nupload_metadata_to_oss = True\n{extra}"
        )
        return p

    def env(self, conf: Path | None = None) -> dict[str, str]:
        return {"HAMAL_CONF": str(conf or self.conf())}

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"hamal/{prefix}"
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def s3(ceph: CephCluster, tmp_path: Path) -> S3Env:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=ceph.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )
    bucket = f"hamal-test-{os.getpid()}-{next(_bucket_ids)}"
    client.create_bucket(Bucket=bucket)
    return S3Env(ceph, bucket, client, tmp_path)
