"""``xnatfs status``: what a mount is doing, from its daemon (see :mod:`xnatfs.control`)."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TextIO

from xnatfs.control import ControlError, connect, find_mount, xnatfs_mounts
from xnatfs.progress import human_bytes
from xnatfs.transports.base import AbstractTransport

PING_SECONDS = 5.0  # a status display must not wait for a stalled server's full timeout


def collect(transport: AbstractTransport, mountpoint: str, cache_dir: str, started: float) -> dict[str, Any]:
    """Return the status of a mount (run in its daemon): source, cache, reachability, downloads, counters."""
    cache = getattr(transport, "cache", None)
    status: dict[str, Any] = {
        "source": str(transport.opts.get("url") or transport.name),
        "mountpoint": mountpoint,
        "pid": os.getpid(),
        "mounted_since": started,
        "cache_dir": cache.directory if cache is not None else cache_dir,
        "cache_bytes": cache.size() if cache is not None else 0,
        "cache_max": getattr(cache, "max_size", None),
        "online": _ping(transport),
        "downloads": cache.stats.in_flight() if cache is not None else [],
        "counters": cache.stats.counters() if cache is not None else {},
    }
    return status


def _ping(transport: AbstractTransport) -> bool:
    """Return ``transport.ping()``, False if it takes longer than PING_SECONDS."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(transport.ping()), name="ping", daemon=True)
    thread.start()
    thread.join(PING_SECONDS)
    return bool(result and result[0])


def query(mountpoint: str, timeout: float = 15.0) -> dict[str, Any]:
    """Return the status of the xnatfs mount at ``mountpoint`` (or any path inside it). Raises ControlError."""
    root, _ = find_mount(mountpoint)
    with connect(root, timeout) as connection:
        return connection.call("status")


def print_status(status: dict[str, Any], out: TextIO) -> None:
    """Write ``status`` for a person to read."""
    cap = status.get("cache_max")
    cached = human_bytes(status.get("cache_bytes") or 0) + (f" of {human_bytes(cap)} cap" if cap else ", no cap")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.get("mounted_since") or 0))
    lines = [
        f"mount:      {status['mountpoint']} (pid {status.get('pid')}, since {since})",
        f"source:     {status['source']} ({'online' if status['online'] else 'OFFLINE'})",
        f"cache:      {status['cache_dir']} ({cached})",
    ]
    downloads = status.get("downloads") or []
    lines.append(f"downloads:  {len(downloads)} in flight")
    for item in downloads:
        total = f" / {human_bytes(item['total'])}" if item.get("total") else ""
        lines.append(f"  {item['path']}  {human_bytes(item['bytes'])}{total}  ({item.get('seconds', 0):.0f} s)")
    counters = status.get("counters") or {}
    if counters:
        lines.append(
            f"since mount: {counters.get('downloads', 0)} downloads, {human_bytes(counters.get('bytes', 0))}, "
            f"{counters.get('hits', 0)} cache hits, {counters.get('errors', 0)} errors"
        )
    out.write("\n".join(lines) + "\n")


def list_mounts(as_json: bool, out: TextIO) -> int:
    """Write the live xnatfs mounts of this machine (their status where this user may ask); return 0."""
    found = []
    for mountpoint, fsname in xnatfs_mounts():
        try:
            status = query(mountpoint, timeout=PING_SECONDS + 5)
        except (ControlError, OSError) as error:
            status = {"mountpoint": mountpoint, "fsname": fsname, "error": str(error)}
        found.append(status)
    if as_json:
        out.write(json.dumps(found) + "\n")
        return 0
    if not found:
        out.write("no xnatfs mounts\n")
    for status in found:
        if "error" in status:
            out.write(f"{status['mountpoint']}  ({status['fsname']}: {status['error']})\n")
            continue
        state = "online" if status["online"] else "OFFLINE"
        out.write(
            f"{status['mountpoint']}  {status['source']}  {state}  {len(status['downloads'])} downloads in flight  "
            f"cache {human_bytes(status['cache_bytes'])} in {status['cache_dir']}\n"
        )
    return 0
