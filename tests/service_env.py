"""A throw-away home for ``hamal-period``: its config, tasks folder, logs, state and targets
under one temporary folder, qcow2 VMs made with qemu-img, and helpers to run and watch it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import MIB, run_hamal, sha256
from nbd_servers import qemu_io


@dataclass
class ServiceEnv:
    root: Path
    extra_conf: str = ""

    def __post_init__(self) -> None:
        for d in ("tasks", "log", "lib", "img"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.write_conf()

    @property
    def conf(self) -> Path:
        return self.root / "hamal.conf"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def store(self) -> str:
        return f"dir:{self.root / 'store'}"

    def write_conf(self, period: str = "interval = 2\ncycle_retry_delay = 1\n", metrics: str = "") -> None:
        self.conf.write_text(
            f"[DEFAULT]\nhamal_lib_dir = {self.lib}\nhamal_info_path = {self.lib}/hamal_info\n"
            f"log_dir = {self.logs}\n"
            f"[period]\ntasks_dir = {self.root / 'tasks'}\n{period}"
            f"[metrics]\nlisten = {metrics}\n{self.extra_conf}"
        )

    # VMs

    def qcow2(self, name: str, size: int = 64 * MIB, *writes: str) -> Path:
        img = self.root / "img" / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size)], check=True)
        if writes:
            qemu_io(img, *writes)
        return img

    def kvm_task(self, tid: str, images: dict[str, Path], target: str | None = None, **extra: Any) -> Path:
        task = {
            "version": 1,
            "id": tid,
            "vm": {"platform": "kvm", "uuid": f"uuid-{tid}", "name": tid},
            "connection": {"images": {d: str(p) for d, p in images.items()}},
            "target": {"uri": target or self.store},
            **extra,
        }
        return self.task_file(tid, task)

    def task_file(self, tid: str, task: dict[str, Any]) -> Path:
        p = self.root / "tasks" / f"{tid}.json"
        p.write_text(json.dumps(task))
        return p

    # Running the service

    def once(self, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "hamal.service.period", "--config", str(self.conf), "--once"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == expect, self.log_text() + r.stderr
        return r

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "hamal.service.period", "--config", str(self.conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self, p: subprocess.Popen[str], sig: int = signal.SIGTERM) -> float:
        """Signals the loop and waits; returns how long it took to exit."""
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=30)
        return time.monotonic() - t0

    def hamal(self, *args: str, expect: int | None = 0) -> Any:
        r = run_hamal("--config", str(self.conf), *args)
        if expect is not None:
            assert r.code == expect, r.err + r.out
        return r

    def status(self) -> dict[str, Any]:
        return json.loads(self.hamal("status", "--json").out)

    def task_status(self, tid: str) -> dict[str, Any]:
        (t,) = [t for t in self.status()["tasks"] if t["id"] == tid]
        return t

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*")) if p.is_file())

    def worker_pids(self) -> list[int]:
        """Workers the loop started, from its subprocess log."""
        text = (self.logs / "hamal-period-subprocess.log").read_text()
        return [int(m) for m in re.findall(r"started worker pid (\d+)", text)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def restore_sha(env: ServiceEnv, store: str, disk: str, version: str, conf: Path | None = None) -> str:
    out = env.root / f"restore-{disk}-{version}.raw"
    r = run_hamal(
        "--config", str(conf or env.conf), "restore", store, str(out), "--disk", disk, "--version", version
    )
    assert r.code == 0, r.err
    digest = sha256(out)
    out.unlink()
    return digest


def image_sha(image: Path) -> str:
    raw = image.with_suffix(".ref.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    digest = sha256(raw)
    raw.unlink()
    return digest


def bitmaps(image: Path) -> list[str]:
    cmd = ["qemu-img", "info", "--output=json", "-U", str(image)]
    info = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
