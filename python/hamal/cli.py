"""The ``hamal`` command: ``sync``, ``restore``, ``versions``, ``verify``, ``prune``, ``map``,
``kvm sync``, ``config check`` and ``demo``.

Exit codes: 0 ok, 1 error (one line on stderr), 2 bad usage, 3 verify found differences,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hamal import _native, log, sync
from hamal.config import load_config
from hamal.errors import ConfigError, HamalError, PlanError, StateError, SyncCancelled
from hamal.progress import wait_with_progress
from hamal.signals import Terminated, handle_sigterm
from hamal.units import human, parse_size

# Imported for type checkers only: `typing` costs the CLI's start ~5 ms (tools/bench --only local).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
#: Commands whose interruption leaves a resumable journal.
JOURNALED = {"sync", "restore", "kvm"}
#: Commands run by the engine alone: Python's logging is imported only if something is logged.
DATA_COMMANDS = {"sync", "restore", "versions", "prune", "verify", "map"}


def _in_range(kind: Any, lo: float, hi: float, shown: tuple[str, str] | None = None) -> Any:
    """An argparse type: ``kind(text)`` within ``lo`` to ``hi``, said in words when it is not."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a number" if kind is float else str(e)
            ) from None
        if not lo <= value <= hi:
            a, b = shown or (f"{lo:g}", f"{hi:g}")
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {a} to {b}")
        return value

    return parse


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a whole number") from None


_chunk = _in_range(parse_size, 4096, 256 << 20, ("4K", "256M"))
_bwlimit = _in_range(parse_size, 1024, 1 << 40, ("1K", "1T"))
_budget = _in_range(parse_size, 8 << 20, 1 << 40, ("8M", "1T"))
_disk_size = _in_range(parse_size, 64 << 20, 1 << 40, ("64M", "1T"))


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, sized to the terminal without ``shutil`` (argparse imports it for
    that, and it imports bz2 and lzma: ~8 ms of every command's start)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return argparse.HelpFormatter(prog, width=columns - 2)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error: ``hamal: error: ...`` and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _help_formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"hamal: error: {message} (see {self.prog} --help)\n")


def _add_sync(sub: Any) -> None:
    s = sub.add_parser("sync", help="copy a disk's allocated or changed extents to a target")
    s.add_argument(
        "source",
        help="source disk URI: file:PATH, a plain path, nbd://HOST:PORT/EXPORT, "
        "nbd+unix:///EXPORT?socket=PATH, rbd:POOL/IMAGE@SNAP[?from_snap=S&conf=PATH&id=NAME&keyring=PATH], "
        "vddk://USER@HOST/[DATASTORE] DIR/DISK.vmdk?vm=vm-N&snapshot=snapshot-N&thumbprint=SHA1"
        "&password_file=PATH, fc://HOST:PORT/RESOURCE?token_file=PATH&snapshot=ID&size=BYTES",
    )
    s.add_argument(
        "target",
        help="target URI: as the source (a missing file is created), or a chunk store dir:PATH / s3://BUCKET/PREFIX",
    )
    s.add_argument("--changed", metavar="FILE.json", help="JSON list of [offset, length] byte pairs to sync")
    s.add_argument("--bitmap", metavar="NAME", help="NBD source: sync the extents dirty in this bitmap")
    s.add_argument("--source-id", help="name of the snapshot read; lets an NBD sync resume from its journal")
    s.add_argument(
        "--parent",
        metavar="VERSION",
        help="chunk store: the version the changes are relative to (default: the disk's newest); "
        "the sync is refused when it is missing",
    )
    s.add_argument(
        "--full-on-mismatch",
        action="store_true",
        help="chunk store: sync in full (saying why) instead of refusing when the parent cannot be used",
    )
    s.add_argument(
        "--disk",
        "--disk-id",
        dest="disk_id",
        help="disk id: its name in a chunk store (required there), logs and summaries (default: the target)",
    )
    s.add_argument("--key-file", help="chunk store encryption key (default [store] encryption_key_file)")
    s.add_argument("--chunk-size", type=_chunk, default=4 << 20, help="chunk grid, 4K to 256M (default 4M)")
    s.add_argument(
        "--readers",
        type=_in_range(_whole, 1, 64),
        help="reader threads, 1 to 64 (default [data_sync_v2] pre_disk_readers_count)",
    )
    s.add_argument(
        "--writers",
        type=_in_range(_whole, 1, 64),
        default=1,
        help="writer threads, 1 to 64 (default 1; a local copy's threads, each reading and writing;"
        " at least 2 onto a block device)",
    )
    s.add_argument(
        "--queue-depth",
        type=_in_range(_whole, 1, 256),
        default=4,
        help="I/O requests in flight per thread, 1 to 256 (default 4)",
    )
    s.add_argument(
        "--checksum", choices=["blake3", "sha256"], help="hash every chunk; report a content digest"
    )
    s.add_argument("--platform", choices=sync.PLATFORMS, help="take *_release_cpu_time from [period]")
    s.add_argument(
        "--release-cpu-time",
        type=_in_range(_whole, 0, 10000),
        metavar="MS",
        help="ms of sleep per MB read, 0 to 10000 (throttle)",
    )
    s.add_argument(
        "--bwlimit", type=_bwlimit, metavar="BYTES/S", help="read bandwidth cap, 1K to 1T, e.g. 100M"
    )
    s.add_argument(
        "--io", choices=["auto", "uring", "pread"], default="auto", help="I/O back end (default auto)"
    )
    s.add_argument(
        "--memory-budget",
        type=_budget,
        default=192 << 20,
        help="in-flight buffer cap over the job, 8M to 1T (default 192M: a job stays under 256 MiB)",
    )
    s.add_argument(
        "--fsync-period",
        type=_in_range(float, 0.05, 3600),
        metavar="S",
        help="flush cadence, 0.05 to 3600 s (default fsync_period_frequency)",
    )
    s.add_argument(
        "--journal",
        help="resume journal (default TARGET.hamal-journal beside a file, else under hamal_lib_dir)",
    )
    s.add_argument("--json", action="store_true", help="print a machine-readable summary")
    s.add_argument(
        "--json-lines",
        action="store_true",
        help="stream JSON lines on stdout: progress events, then the summary event",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_restore(sub: Any) -> None:
    r = sub.add_parser("restore", help="write a version from a chunk store to a disk (file, device, NBD)")
    r.add_argument("store", help="dir:PATH or s3://BUCKET/PREFIX")
    r.add_argument("target", help="target disk URI; a missing file is created (sparse)")
    r.add_argument("--disk", required=True, help="disk id in the store")
    r.add_argument("--version", dest="store_version", help="version id (default: the newest)")
    r.add_argument("--key-file", help="encryption key of the store")
    r.add_argument(
        "--journal",
        help="resume journal (default TARGET.hamal-journal beside a file, else under hamal_lib_dir)",
    )
    r.add_argument("--json", action="store_true")
    r.add_argument("--no-progress", action="store_true")


def _add_versions(sub: Any) -> None:
    vs = sub.add_parser("versions", help="list the versions in a chunk store")
    vs.add_argument("store")
    vs.add_argument("--disk", help="only this disk")
    vs.add_argument("--key-file", help="encryption key of the store")
    vs.add_argument("--json", action="store_true")


def _add_prune(sub: Any) -> None:
    pr = sub.add_parser("prune", help="keep the newest N versions per disk, remove unreferenced chunks")
    pr.add_argument("store")
    pr.add_argument(
        "--keep", type=_in_range(_whole, 1, 129), required=True, help="versions kept per disk (1 to 129)"
    )
    pr.add_argument("--disk", help="only prune this disk's versions")
    pr.add_argument("--key-file", help="encryption key of the store")
    pr.add_argument("--json", action="store_true")


def _add_verify(sub: Any) -> None:
    v = sub.add_parser(
        "verify",
        help="compare source and target chunk by chunk, or check a chunk store (verify STORE [--deep])",
    )
    v.add_argument("source", help="source disk URI, or a chunk store")
    v.add_argument("target", nargs="?", help="target disk URI (not given for a chunk store)")
    v.add_argument("--disk", help="chunk store: only this disk")
    v.add_argument("--version", dest="store_version", help="chunk store: only this version")
    v.add_argument("--deep", action="store_true", help="chunk store: re-read and re-hash every chunk")
    v.add_argument("--key-file", help="chunk store: its encryption key")
    v.add_argument("--changed", metavar="FILE.json", help="compare only these extents")
    v.add_argument("--chunk-size", type=_chunk, default=4 << 20, help="4K to 256M (default 4M)")
    v.add_argument("--checksum", choices=["blake3", "sha256"], default="blake3")
    v.add_argument("--io", choices=["auto", "uring", "pread"], default="auto")
    v.add_argument("--json", action="store_true")


def _add_map(sub: Any) -> None:
    m = sub.add_parser("map", help="print a source's size, allocated extents and dirty extents")
    m.add_argument("source")
    m.add_argument("--bitmap", metavar="NAME", help="NBD source: also list the extents dirty in this bitmap")
    m.add_argument("--json", action="store_true")


def _add_kvm(sub: Any) -> None:
    k = sub.add_parser("kvm", help="KVM / qcow2 images: change tracking with persistent dirty bitmaps")
    ksub = k.add_subparsers(dest="kvm_command", required=True)
    ks = ksub.add_parser("sync", help="one cycle: new bitmap, export, sync the old bitmap's changes, rotate")
    ks.add_argument("image", help="qcow2 image (its guest must not be writing to it)")
    ks.add_argument("target", help="target disk URI")
    ks.add_argument("--full", action="store_true", help="ignore the cursor and sync every allocated extent")
    ks.add_argument("--journal", help="resume journal path")
    ks.add_argument("--json", action="store_true")


def _add_config(sub: Any) -> None:
    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="print the effective config (secrets masked) or the error")
    cc.add_argument(
        "path", nargs="?", help="file to check (default: --config, $HAMAL_CONF, /etc/hamal/hamal.conf)"
    )


def _add_status(sub: Any) -> None:
    st = sub.add_parser("status", help="the service's tasks and disks: state, versions, lag, errors")
    st.add_argument("--json", action="store_true")


def _add_health(sub: Any) -> None:
    sub.add_parser("health", help="exit 0 only when the service is healthy (the container's health check)")


def _add_task(sub: Any) -> None:
    t = sub.add_parser("task", help="the service's tasks: list, show, pause, resume, resync, run-now")
    t.add_argument("action", choices=["list", "show", "pause", "resume", "resync", "run-now"])
    t.add_argument("task_id", nargs="?", help="the task (all but list)")
    t.add_argument("--json", action="store_true")


def _add_mass(sub: Any) -> None:
    ms = sub.add_parser("mass", help="the control plane (Mass)")
    msub = ms.add_subparsers(dest="mass_command", required=True)
    msub.add_parser("check", help="connect with the configured [mass] settings; say in one line what works")


def _add_demo(sub: Any) -> None:
    d = sub.add_parser(
        "demo", help="run the service on two generated qcow2 VMs, write between cycles, restore every version"
    )
    d.add_argument("--dir", default="hamal-demo", help="working directory (default ./hamal-demo)")
    d.add_argument(
        "--size", type=_disk_size, default=256 << 20, help="size of each disk, 64M to 1T (default 256M)"
    )


SUBCOMMANDS = {
    "sync": _add_sync,
    "restore": _add_restore,
    "versions": _add_versions,
    "prune": _add_prune,
    "verify": _add_verify,
    "map": _add_map,
    "kvm": _add_kvm,
    "config": _add_config,
    "status": _add_status,
    "health": _add_health,
    "task": _add_task,
    "mass": _add_mass,
    "demo": _add_demo,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with a known ``command`` only that subcommand: building all
    of them cost every ``hamal sync`` ~15 ms of start-up."""
    p = _Parser(prog="hamal", description="Agentless block-level disk sync.")
    p.add_argument("--version", action="version", version=f"hamal {_native.__version__}")
    p.add_argument("--config", help="hamal.conf path (default: $HAMAL_CONF or /etc/hamal/hamal.conf)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, add in SUBCOMMANDS.items():
        if command in (None, name):
            add(sub)
    return p


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, when it is a known one."""
    args = iter(argv)
    for a in args:
        if a == "--config":
            next(args, None)
        elif not a.startswith("-"):
            return a if a in SUBCOMMANDS else None
    return None


def _changed(path: str | None) -> list[tuple[int, int]] | None:
    return _native.load_changed_file(path) if path else None


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    options = sync.SyncOptions(
        chunk_size=args.chunk_size,
        readers=args.readers,
        writers=args.writers,
        queue_depth=args.queue_depth,
        checksum=args.checksum,
        # A VMware disk takes [period] vmware_release_cpu_time unless told otherwise.
        platform=args.platform or ("vmware" if args.source.startswith("vddk://") else None),
        release_cpu_ms_per_mb=args.release_cpu_time,
        bwlimit_bps=args.bwlimit,
        io_mode=args.io,
        memory_budget=args.memory_budget,
        fsync_period_s=args.fsync_period,
        key_file=args.key_file,
    )
    plan = [
        sync.disk(
            args.source,
            args.target,
            disk_id=args.disk_id,
            changed=_changed(args.changed),
            changed_origin=args.changed,
            journal=args.journal,
            bitmap=args.bitmap,
            source_id=args.source_id,
            parent=args.parent,
            full_on_mismatch=args.full_on_mismatch,
        )
    ]
    job = sync.start(plan, cfg, options)
    show = not (args.json or args.json_lines or args.no_progress) and sys.stderr.isatty()
    (summary,) = wait_with_progress(job, show, sys.stdout if args.json_lines else None)
    if args.json_lines:
        print(json.dumps({"event": "summary", **summary}), flush=True)
    elif args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_describe_sync(summary))
    return EXIT_OK


def _describe_sync(s: dict[str, Any]) -> str:
    rate = s["bytes_total"] / s["seconds"] if s["seconds"] > 0 else 0.0
    line = (
        f"{s['disk_id']}: {s['mode']} sync of {human(s['bytes_total'])} in {s['seconds']:.2f} s "
        f"({human(rate)}/s): {human(s['bytes_written'])} written, {human(s['bytes_zero'])} zero, "
        f"{human(s['bytes_resumed'])} resumed, {human(s['holes_zeroed'])} holes zeroed [{s['io_backend']}]"
    )
    if s.get("full_reason"):
        line += f"\n  full sync instead of incremental: {s['full_reason']}"
    if s.get("version"):
        on = f" on parent {s['parent']}" if s.get("parent") else ""
        line += f"\n  committed version {s['version']}{on} to {s['target']}"
    if s.get("content_digest") and not s.get("version"):
        line += f"\n  {s['checksum']} content digest {s['content_digest']}"
    return line


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    plan = [
        sync.disk(
            args.store, args.target, disk_id=args.disk, version=args.store_version, journal=args.journal
        )
    ]
    job = sync.start(plan, cfg, sync.SyncOptions(key_file=args.key_file))
    show = not (args.json or args.no_progress) and sys.stderr.isatty()
    (s,) = wait_with_progress(job, show)
    _emit(
        args,
        s,
        f"restored {s['source']} to {s['target']}: {human(s['size'])}, "
        f"{human(s['bytes_written'])} written in {s['seconds']:.2f} s",
    )
    return EXIT_OK


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Prints `data` as JSON with --json, else the human line `text`."""
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_versions(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    versions, damaged = _native.list_versions(args.store, cfg, disk=args.disk, key_file=args.key_file)
    if args.json:
        print(json.dumps({"versions": versions, "damaged": damaged}, indent=2))
    else:
        print(f"{'DISK':<20} {'VERSION':<24} {'MODE':<11} {'SIZE':>10} {'NEW DATA':>10} CREATED")
        for v in versions:
            st = v["stats"]
            print(
                f"{v['disk']:<20} {v['version']:<24} {st['mode']:<11} {human(v['size']):>10} "
                f"{human(st['bytes_stored']):>10} {v['created']}"
            )
    for line in damaged:
        print(f"hamal: damaged version record {line}", file=sys.stderr)
    return EXIT_MISMATCH if damaged else EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    report = _native.prune_store(args.store, args.keep, cfg, disk=args.disk, key_file=args.key_file)
    _emit(
        args,
        report,
        f"removed {len(report['removed_versions'])} versions, kept {report['kept_versions']}; "
        f"removed {report['removed_chunks']} chunks and {report['removed_pages']} index pages; "
        f"cleaned {report['removed_locks']} dead locks, {report['removed_temporaries']} temporary objects "
        f"and {report['removed_quarantined']} quarantined chunks",
    )
    if report["gc_skipped"]:
        print(f"hamal: unreferenced chunks were not collected: {report['gc_skipped']}", file=sys.stderr)
    return EXIT_OK


def cmd_verify_store(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    report = _native.verify_store(
        args.source,
        cfg,
        disk=args.disk,
        version=args.store_version,
        deep=args.deep,
        key_file=args.key_file,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    for p in report["problems"]:
        print(f"hamal: {p}", file=sys.stderr)
    if report["quarantined"]:
        print(
            f"hamal: marked {report['quarantined']} damaged or missing chunks in the quarantine (a copy;"
            " nothing was deleted); the next sync that reads their data uploads them again",
            file=sys.stderr,
        )
    for left in report["leftovers"]:
        print(f"hamal: left behind by a killed run (prune removes it): {left}", file=sys.stderr)
    if report["problems"]:
        return EXIT_MISMATCH
    if not args.json:
        how = f"deep: {human(report['bytes_checked'])} re-hashed" if report["deep"] else "all present"
        print(f"ok: {report['versions']} versions, {report['chunks']} chunks ({how})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    if args.target is None:
        if not sync.is_store(args.source):
            raise PlanError("verify needs SOURCE and TARGET, or one chunk store (dir:PATH or s3://...)")
        return cmd_verify_store(args)
    report = _native.verify(
        args.source,
        args.target,
        load_config(args.config),
        changed=_changed(args.changed),
        changed_origin=args.changed or "changed list",
        chunk_size=args.chunk_size,
        checksum=args.checksum,
        io_mode=args.io,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    bad = report["mismatched_chunks"]
    if bad:
        offsets = ", ".join(str(o) for o in report["mismatch_offsets"])
        print(
            f"hamal: {bad} of {report['chunks']} chunks differ; first at offsets {offsets}", file=sys.stderr
        )
        return EXIT_MISMATCH
    if not args.json:
        print(f"identical: {report['chunks']} chunks, {human(report['bytes_compared'])} compared")
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    m = _native.map_source(args.source, load_config(args.config), bitmap=args.bitmap)
    if args.json:
        print(json.dumps(m, indent=2))
        return EXIT_OK
    print(f"{m['source']}: {human(m['size'])}")
    for name in ("allocated", "changed"):
        extents = m[name]
        if extents is None:
            continue
        print(f"{name}: {len(extents)} extents, {human(sum(ln for _, ln in extents))}")
        for off, ln in extents:
            print(f"  {off:>16} {ln:>14}")
    return EXIT_OK


def cmd_kvm(args: argparse.Namespace) -> int:
    from hamal.platforms import kvm

    cfg = load_config(args.config)
    summary = kvm.sync_image(args.image, args.target, cfg, full=args.full, journal=args.journal)
    print(json.dumps(summary, indent=2) if args.json else _describe_sync(summary))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.path or args.config)
    state = "" if cfg.found else "  (file not found: defaults)"
    print(f"# effective configuration from {cfg.path}{state}")
    print(cfg.render(), end="")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from hamal.service import status

    report = status.status(load_config(args.config).as_dict())
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(status.render(report))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from hamal.service import status

    problems = status.health(load_config(args.config).as_dict())
    for p in problems:
        print(f"unhealthy: {p}", file=sys.stderr)
    if not problems:
        print("healthy")
    return EXIT_ERROR if problems else EXIT_OK


def cmd_task(args: argparse.Namespace) -> int:
    from hamal.service import status

    conf = load_config(args.config).as_dict()
    if args.action == "list":
        report = status.status(conf)
        if args.json:
            print(json.dumps([{k: t[k] for k in ("id", "vm", "platform", "state")} for t in report["tasks"]]))
        for t in [] if args.json else report["tasks"]:
            print(f"{t['id']:<24} {t['platform']:<8} {t['vm']:<24} {t['state']}")
        return EXIT_OK
    if not args.task_id:
        raise PlanError(f"hamal task {args.action} needs a task id")
    if args.action == "show":
        report = status.status(conf)
        found = [t for t in report["tasks"] if t["id"] == args.task_id]
        if not found:
            raise PlanError(f"no task {args.task_id!r} (see hamal task list)")
        print(json.dumps(found[0], indent=2))
        return EXIT_OK
    print(status.task_action(conf, args.action, args.task_id))
    return EXIT_OK


def cmd_mass(args: argparse.Namespace) -> int:
    from hamal.control.check import check

    ok, line = check(load_config(args.config).as_dict())
    print(line, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from hamal.demo import run_demo

    return run_demo(args.dir, args.size)


COMMANDS = {
    "sync": cmd_sync,
    "restore": cmd_restore,
    "versions": cmd_versions,
    "prune": cmd_prune,
    "verify": cmd_verify,
    "map": cmd_map,
    "kvm": cmd_kvm,
    "config": cmd_config_check,
    "status": cmd_status,
    "health": cmd_health,
    "task": cmd_task,
    "mass": cmd_mass,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_in(argv)).parse_args(argv)
    log.cli(args.verbose, lazy=args.command in DATA_COMMANDS)
    handle_sigterm()
    resume = " (finished chunks are journaled; rerun to resume)" if args.command in JOURNALED else ""
    try:
        if args.config is not None and not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config}: no such file (only the default path may be missing)")
        return COMMANDS[args.command](args)
    except SyncCancelled as e:
        print(f"hamal: {e}{resume}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"hamal: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"hamal: terminated{resume}", file=sys.stderr)
        return EXIT_TERMINATED
    except (HamalError, OSError, StateError) as e:
        print(f"hamal: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
