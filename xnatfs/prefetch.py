"""``xnatfs prefetch``: fill a mount's cache with everything below some paths, before a job reads them.

The daemon of the mount does the downloads (:class:`Prefetcher`, served on its control socket),
so the cache's rules apply as for any read: one download per resource however many ask, the
cache cap, the timeouts. The command (:func:`run`) asks the daemon for the *plan* of each path
(its units of download: XNAT resources, PACS series), then has it fetch the units not cached
yet, ``jobs`` at a time, showing a progress bar on a terminal.
"""

from __future__ import annotations

import contextlib
import posixpath
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from xnatfs.cache import IncompleteEntry
from xnatfs.control import Connection, ControlError, Send, control_socket, find_mount
from xnatfs.options import PREFETCH_JOBS, TIMEOUT
from xnatfs.progress import byte_bar, human_bytes
from xnatfs.stats import tree_size
from xnatfs.transports.base import AbstractTransport, normpath

MAX_PARALLEL = 8  # daemon-wide bound on prefetch downloads, whatever the clients ask
PROGRESS_SECONDS = 0.25
PLAN_TIMEOUT = 600.0  # listing a whole project may take a while on a big server
FETCH_IDLE_TIMEOUT = 120.0  # the daemon sends progress every PROGRESS_SECONDS while it works


# -- daemon side ------------------------------------------------------------------------------


class Prefetcher:
    """The daemon's side: ``plan`` and ``fetch`` operations of the control socket."""

    def __init__(self, transport: AbstractTransport, timeout: float = TIMEOUT) -> None:
        self.transport = transport
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(MAX_PARALLEL)

    def handlers(self) -> dict[str, Any]:
        """Return the control operations this object serves."""
        return {"plan": self.plan, "fetch": self.fetch}

    def plan(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """Return the units of download below ``request["path"]``: ``{"units": [{"id", "path" (one
        of its files), "label", "size", "files", "cached"}], "files": N, "local": N}``. Lists only."""
        units: dict[str, dict[str, Any]] = {}
        files = local = 0
        for path in self._files_below(normpath(request["path"])):
            files += 1
            unit = self.transport.content_unit(path)
            if unit is None or unit.entry is None:
                local += 1
                continue
            found = units.get(unit.id)
            if found is None:
                units[unit.id] = {
                    "id": unit.id,
                    "path": path,
                    "label": unit.label,
                    "size": unit.size,
                    "files": 1,
                    "cached": unit.entry.is_complete(),
                }
            else:
                found["files"] += 1
        return {"units": list(units.values()), "files": files, "local": local}

    def _files_below(self, path: str) -> Iterator[str]:
        if not self.transport.stat(path).is_dir:
            yield path
            return
        for root, _dirs, names in self.transport.walk(path):
            for name in names:
                yield posixpath.join(root, name)

    def fetch(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """Fill the unit of download holding file ``request["path"]`` completely; send ``{"bytes"}``
        progress meanwhile; return ``{"bytes": size of the unit}``. Raises the download's error."""
        path = normpath(request["path"])
        unit = self.transport.content_unit(path)
        if unit is None or unit.entry is None:
            return {"bytes": 0}
        outcome: list[BaseException] = []
        finished = threading.Event()

        def work() -> None:
            try:
                with self._slots, self._stats_context(unit.label, unit.size):
                    for attempt in range(2):
                        self.transport.fetch(path)  # starts the unit's download (or finds it cached)
                        try:
                            unit.entry.wait_complete(self.timeout)  # the file came first; wait for all
                            return
                        except IncompleteEntry:
                            if attempt:
                                raise
            except BaseException as error:  # noqa: BLE001 - handed to the client
                outcome.append(error)
            finally:
                finished.set()

        threading.Thread(target=work, name=f"prefetch-{unit.id}", daemon=True).start()
        while not finished.wait(PROGRESS_SECONDS):
            send({"bytes": tree_size(unit.entry.staging) or tree_size(unit.entry.path)})
        if outcome:
            raise outcome[0]
        return {"bytes": tree_size(unit.entry.path)}

    def _stats_context(self, label: str, total: int | None) -> Any:
        stats = getattr(getattr(self.transport, "cache", None), "stats", None)
        if stats is None:
            return contextlib.nullcontext()
        return stats.context(label, total)


# -- command side -----------------------------------------------------------------------------


class _Run:
    """One ``xnatfs prefetch``: the units to fetch and what became of them."""

    def __init__(self, jobs: int, out: TextIO, err: TextIO) -> None:
        self.jobs = max(1, jobs)
        self.out = out
        self.err = err
        self.units: list[dict[str, Any]] = []  # to fetch, each with "mount" and "socket"
        self.already = 0
        self.failures: list[tuple[str, str]] = []
        self.done = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.connections: set[Connection] = set()
        self.bar: Any = None

    def plan(self, paths: list[str]) -> None:
        seen: set[tuple[str, str]] = set()
        for given in paths:
            try:
                mountpoint, tree_path = find_mount(given)
                socket = control_socket(mountpoint)
                with Connection(socket, PLAN_TIMEOUT) as connection:
                    reply = connection.call("plan", path=tree_path)
            except (ControlError, OSError) as error:
                self.failures.append((given, str(error)))
                continue
            for unit in reply["units"]:
                if (mountpoint, unit["id"]) in seen:
                    continue
                seen.add((mountpoint, unit["id"]))
                if unit["cached"]:
                    self.already += 1
                else:
                    unit.update(mount=mountpoint, socket=socket)
                    self.units.append(unit)

    def fetch_all(self) -> None:
        sizes = [u["size"] for u in self.units]
        total = sum(sizes) if sizes and all(s is not None for s in sizes) else None
        self.bar = _bar(total, len(self.units), self.err)
        queue = list(reversed(self.units))
        threads = [
            threading.Thread(target=self._worker, args=(queue,), name=f"prefetch-{n}", daemon=True)
            for n in range(min(self.jobs, len(self.units)))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:
            self.bar.close()

    def interrupt(self) -> None:
        """Stop: no new units, and the ones in progress are let go (the daemon finishes them)."""
        self.stop.set()
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            connection.close()

    def _worker(self, queue: list[dict[str, Any]]) -> None:
        while not self.stop.is_set():
            with self.lock:
                if not queue:
                    return
                unit = queue.pop()
            seen = 0
            try:
                connection = Connection(unit["socket"], FETCH_IDLE_TIMEOUT)
                with self.lock:
                    self.connections.add(connection)
                try:
                    for message in connection.request("fetch", path=unit["path"]):
                        got = int(message.get("bytes") or 0)
                        if message.get("done") and unit.get("size") is not None:
                            got = max(got, unit["size"])
                        with self.lock:
                            self.bar.update(max(got - seen, 0))
                            seen = max(seen, got)
                finally:
                    with self.lock:
                        self.connections.discard(connection)
                    connection.close()
            except (ControlError, OSError, ValueError) as error:
                if not self.stop.is_set():
                    with self.lock:
                        self.failures.append((unit["label"], str(error)))
                continue
            with self.lock:
                self.done += 1
                self.bytes += seen
                self.bar.set_description_str(f"resources {self.done}/{len(self.units)}", refresh=True)


def _bar(total: int | None, count: int, err: TextIO) -> Any:
    return byte_bar(f"resources 0/{count}", total, err, miniters=1, mininterval=0.2)


def run(paths: list[str], jobs: int = PREFETCH_JOBS, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Prefetch everything below ``paths`` (inside live xnatfs mounts); return the exit status.

    0 when everything below them is cached at the end, 1 when something failed (listed on
    ``err``), 130 when interrupted (finished resources stay cached).
    """
    out, err = out or sys.stdout, err or sys.stderr
    started = time.monotonic()
    job = _Run(jobs, out, err)
    try:
        job.plan(paths)
        job.fetch_all()
    except KeyboardInterrupt:
        job.interrupt()
        out.write(
            f"xnatfs prefetch: interrupted; {job.done} of {len(job.units)} resources fetched "
            f"({human_bytes(job.bytes)}), finished ones stay cached\n"
        )
        return 130
    # A cache cap smaller than the data evicts what was fetched first: say so rather than claim success.
    if not job.failures and job.units:
        evicted = _recheck(job.units)
        job.failures += [(label, "no longer cached (the cache cap is smaller than the data)") for label in evicted]
    seconds = time.monotonic() - started
    for label, message in job.failures:
        err.write(f"xnatfs: error: {label}: {message}\n")
    out.write(
        f"xnatfs prefetch: {job.done + job.already} resources cached ({job.already} were already), "
        f"{human_bytes(job.bytes)} downloaded in {seconds:.1f} s, {len(job.failures)} failed\n"
    )
    return 1 if job.failures else 0


def _recheck(units: list[dict[str, Any]]) -> list[str]:
    """Return the labels of ``units`` that the daemon no longer has complete in its cache."""
    missing = []
    for unit in units:
        try:
            with Connection(unit["socket"], PLAN_TIMEOUT) as connection:
                reply = connection.call("plan", path=unit["path"])
        except (ControlError, OSError):
            missing.append(unit["label"])
            continue
        if not all(u["cached"] for u in reply["units"]):
            missing.append(unit["label"])
    return missing
