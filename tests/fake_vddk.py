"""The fake VixDiskLib (``rust/fake-vddk``) built in its variants and laid out as VDDK
directories (``<libdir>/lib64/libvixDiskLib.so.N``), plus a fake vSphere disk around it: the
raw file it serves, its call log and its knobs. Test-only; never shipped."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THUMBPRINT = ":".join(["5E"] * 20)
PASSWORD = "s3cret-Pa55"

# name: (cargo features, soname version)
VARIANTS = {
    "v8": (["--features", "v8"], 8),
    "v6": ([], 6),
    "no_read": (["--features", "v8,no_read"], 8),
}


def build_variants(dest: Path) -> dict[str, Path]:
    """Builds every variant (release) and returns its VDDK directory."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    out = {}
    for name, (features, major) in VARIANTS.items():
        subprocess.run(
            ["cargo", "build", "--release", "--quiet", "-p", "fake-vddk", *features],
            cwd=REPO,
            check=True,
        )
        lib64 = dest / name / "lib64"
        lib64.mkdir(parents=True)
        shutil.copy(target / "release" / "libvixDiskLib.so", lib64 / f"libvixDiskLib.so.{major}")
        out[name] = dest / name
    return out


@dataclass
class Call:
    pid: int
    name: str
    args: dict[str, str] = field(default_factory=dict)

    def n(self) -> int:
        return int(self.args["n"])


@dataclass
class FakeVm:
    """One VM disk served by the fake library: ``[ds1] vm/disk.vmdk`` is ``root/vm/disk.vmdk``."""

    root: Path
    log: Path
    password_file: Path
    fail: str = ""

    @property
    def disk(self) -> Path:
        return self.root / "vm" / "disk.vmdk"

    def uri(self, libdir: Path | None = None, disk: str = "vm/disk.vmdk", **options: str) -> str:
        q = {
            "vm": "vm-42",
            "snapshot": "snapshot-7",
            "thumbprint": THUMBPRINT.lower(),
            "password_file": str(self.password_file),
            **({"libdir": str(libdir)} if libdir else {}),
            **options,
        }
        query = "&".join(f"{k}={v}" for k, v in q.items())
        return f"vddk://root@127.0.0.1/[ds1] {disk}?{query}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "FAKE_VDDK_ROOT": str(self.root),
            "FAKE_VDDK_LOG": str(self.log),
            "FAKE_VDDK_FAIL": self.fail,
            "FAKE_VDDK_THUMBPRINT": THUMBPRINT,
            "FAKE_VDDK_PASSWORD": PASSWORD,
            **extra,
        }

    def calls(self) -> list[Call]:
        """The calls recorded since the last ``reset``."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            pid, name, *rest = line.split(" ")
            args = dict(a.split("=", 1) for a in rest if "=" in a)
            out.append(Call(int(pid), name, args))
        return out

    def reset(self) -> None:
        self.log.unlink(missing_ok=True)


def make_vm(tmp: Path) -> FakeVm:
    (tmp / "root" / "vm").mkdir(parents=True)
    pw = tmp / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return FakeVm(root=tmp / "root", log=tmp / "vddk-calls.log", password_file=pw)
