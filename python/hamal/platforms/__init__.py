"""Platform adapters: snapshot, change query and cleanup for each platform, behind one
interface (``base.Adapter``). Adapters never move disk data themselves; they hand the engine a
source URI and its changes."""

from __future__ import annotations

from typing import Any

from hamal.errors import PlanError
from hamal.platforms.base import Adapter


def adapter_for(platform: str, conf: dict[str, Any] | None = None) -> Adapter:
    """The adapter of a task's ``vm.platform``; ``conf`` is ``hamal.conf`` (its
    ``[fusion_compute]`` timeouts)."""
    if platform == "kvm":
        from hamal.platforms.kvm import KvmAdapter

        return KvmAdapter()
    if platform == "rbd":
        from hamal.platforms.rbd import RbdAdapter

        return RbdAdapter()
    if platform == "vmware":
        from hamal.platforms.vmware import VmwareAdapter

        return VmwareAdapter(conf)
    if platform == "openstack":
        from hamal.platforms.openstack import OpenStackAdapter

        return OpenStackAdapter()
    if platform == "fusioncompute":
        from hamal.platforms.fusioncompute import FusionComputeAdapter

        return FusionComputeAdapter(conf)
    raise PlanError(
        f"platform {platform!r} has no adapter (kvm, rbd, vmware, openstack and fusioncompute do)"
    )


def disk_flag_rule(conf: dict[str, Any], platform: str) -> tuple[bool, int]:
    """``(skip_disk_flag, disk_flag_size)`` for a platform: ``[vmware]`` for VMware, else
    ``[openstack_ceph]`` (the manual names those two sections)."""
    section = conf["vmware"] if platform == "vmware" else conf["openstack_ceph"]
    return bool(section["skip_disk_flag"]), int(section["disk_flag_size"])
