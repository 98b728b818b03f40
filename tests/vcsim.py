"""The vSphere simulator of tests/vcsim/main.go: built once per machine (keyed by the hash of
its source) with Debian's Go and govmomi, started on 127.0.0.1 with the VMs and disks a test
specifies, and helpers that write to a VM's disk and log the change as CBT would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "vcsim" / "main.go"
GOVMOMI = Path("/usr/share/gocode/src/github.com/vmware/govmomi")
USER = "administrator@vsphere.local"
PASSWORD = "vc-Passw0rd-31"


def build() -> Path:
    if shutil.which("go") is None or not GOVMOMI.is_dir():
        pytest.skip("Go and govmomi are not installed (tools/test installs golang-go and govmomi)")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = REPO / ".cache" / "vcsim"
    binary = cache / f"vcsim-hamal-{digest}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        gopath = f"{cache}/gopath:/usr/share/gocode"
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": gopath, "GOCACHE": str(cache / "gocache")}
        tmp = binary.with_suffix(".tmp")
        subprocess.run(["go", "build", "-o", str(tmp), "."], cwd=SOURCE.parent, env=env, check=True)
        tmp.rename(binary)
    return binary


@dataclass
class Disk:
    key: int
    file: str
    capacity: int
    mode: str = "persistent"
    uuid: str = ""


@dataclass
class Vcsim:
    root: Path
    vms: dict[str, tuple[str, list[Disk]]]  # name -> (hardware version, disks)
    page: int = 4
    ips: dict[str, list[str]] = field(default_factory=dict)  # VM name -> guest addresses
    tls: tuple[Path, Path] | None = None  # certificate and key; default the library's own
    proc: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spec_path(self) -> Path:
        return self.root / "spec.json"

    def write_spec(self) -> None:
        vms = [
            {"name": n, "version": v, "disks": [d.__dict__ for d in disks], "ips": self.ips.get(n, [])}
            for n, (v, disks) in self.vms.items()
        ]
        self.spec_path.write_text(json.dumps({"vms": vms}))

    def start(self) -> Vcsim:
        binary = build()
        for _, disks in self.vms.values():
            for d in disks:
                path = self.root / d.file
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    with open(path, "wb") as f:
                        f.truncate(d.capacity)
                d.uuid = d.uuid or f"6000C29{d.key:04d}-{hashlib.sha1(d.file.encode()).hexdigest()[:8]}"
        self.write_spec()
        # Each disk's change log (what CBT tracks once on): its epoch, no change yet.
        log = {
            d.file: {"epoch": "52 00 00 01", "changes": []} for _, disks in self.vms.values() for d in disks
        }
        (self.root / "changes.json").write_text(json.dumps(log))
        args = ["-root", str(self.root), "-spec", str(self.spec_path), "-page", str(self.page)]
        if self.tls:
            args += ["-cert", str(self.tls[0]), "-key", str(self.tls[1])]
        with open(self.root / "vcsim.log", "w") as log:
            self.proc = subprocess.Popen(
                [str(binary), *args, "-user", USER, "-password", PASSWORD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def port(self) -> int:
        return int(self.info["url"].split(":")[2].split("/")[0])

    def uuid(self, name: str) -> str:
        return next(v["instance_uuid"] for v in self.info["vms"] if v["name"] == name)

    def thumbprint(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", self.port)))
        h = hashlib.sha1(der).hexdigest().upper()
        return ":".join(h[i : i + 2] for i in range(0, 40, 2))

    # The disks, as a guest would change them

    def changes(self) -> dict[str, Any]:
        p = self.root / "changes.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def write(self, file: str, offset: int, data: bytes, tracked: bool = True) -> None:
        with open(self.root / file, "r+b") as f:
            f.seek(offset)
            f.write(data)
        if tracked:
            log = self.changes()
            entry = log.setdefault(file, {"epoch": "52 00 00 01", "changes": []})
            entry["changes"].append([offset, len(data)])
            (self.root / "changes.json").write_text(json.dumps(log))

    def reset_cbt(self, file: str, epoch: str) -> None:
        log = self.changes()
        log[file] = {"epoch": epoch, "changes": []}
        (self.root / "changes.json").write_text(json.dumps(log))

    def grow(self, vm: str, key: int, capacity: int) -> None:
        for d in self.vms[vm][1]:
            if d.key == key:
                d.capacity = capacity
                with open(self.root / d.file, "r+b") as f:
                    f.truncate(capacity)
        self.write_spec()

    # The API, as an operator (or another tool) would use it

    def _connect(self) -> Any:
        from pyVim.connect import SmartConnect

        ctx = ssl._create_unverified_context()
        return SmartConnect(host="127.0.0.1", port=self.port, user=USER, pwd=PASSWORD, sslContext=ctx)

    def take_snapshots(self, name: str, names: list[str]) -> None:
        """Snapshots of another tool."""
        from pyVim.connect import Disconnect

        si = self._connect()
        try:
            vm = si.RetrieveContent().searchIndex.FindByUuid(None, self.uuid(name), True, True)
            for n in names:
                task = vm.CreateSnapshot_Task(name=n, description="not hamal's", memory=False, quiesce=False)
                deadline = time.monotonic() + 30
                while task.info.state not in ("success", "error") and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            Disconnect(si)

    def snapshots(self, name: str) -> list[str]:
        from pyVim.connect import Disconnect
        from pyVmomi import vim, vmodl

        si = self._connect()
        try:
            content = si.RetrieveContent()
            vm = content.searchIndex.FindByUuid(None, self.uuid(name), True, True)
            pc = vmodl.query.PropertyCollector
            wanted = pc.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])
            spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=vm)], propSet=[wanted])
            found = content.propertyCollector.RetrieveContents([spec])
            props = {p.name: p.val for p in found[0].propSet}
            out: list[str] = []

            def walk(nodes: Any) -> None:
                for n in nodes or []:
                    out.append(n.name)
                    walk(n.childSnapshotList)

            if props.get("snapshot"):
                walk(props["snapshot"].rootSnapshotList)
            return out
        finally:
            Disconnect(si)
