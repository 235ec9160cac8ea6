"""The persistent cache: downloaded content, shared by threads, mounts and processes.

The cache holds *entries*. An entry is one unit of download -- an XNAT scan resource, a PACS
series -- identified by a key (server, project, experiment, scan, resource) and a version taken
from the server (digests, sizes, dates), so that changed data gets a new entry. On disk::

    {cache_dir}/v1/{key hash}/{version hash}/           complete content (moved there by rename)
    {cache_dir}/v1/{key hash}/{version hash}.staging/   content being filled
    {cache_dir}/v1/{key hash}/{version hash}.lock       flock: held by whoever fills the entry
    {cache_dir}/v1/{key hash}/{version hash}.json       key, version, size, last use

An entry's fill and its readers are :mod:`xnatfs.cache_entry`'s; this module keeps the directory:
entries by key and version, their sizes and last use, and eviction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass

from xnatfs import privacy
from xnatfs.cache_entry import (
    LAYOUT,
    CacheEntry,
    Filler,
    FillFunction,
    IncompleteEntry,
)
from xnatfs.options import default_cache_dir
from xnatfs.stats import CacheStats

__all__ = [
    "Cache",
    "CacheEntry",
    "EntryInfo",
    "FillFunction",
    "Filler",
    "IncompleteEntry",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

# An entry used this recently is never evicted: a reader may be about to open it.
EVICTION_GRACE_SECONDS = 60.0
TOUCH_INTERVAL = 30.0  # well below EVICTION_GRACE_SECONDS, so an entry in use is never evicted


@dataclass(frozen=True)
class EntryInfo:
    """A complete cache entry as found on disk: where (``base``), what, how big, last use (epoch)."""

    base: str
    key: tuple[str, ...]
    version: str
    size: int
    last_used: float


class Cache:
    """A cache directory shared by every mount and process that uses it.

    ``max_size`` (bytes) caps the total size of complete entries: after each fill, the least
    recently used entries are removed until the total fits. Entries in use (locked, or used in
    the last minute) are never removed; files already open stay readable (the kernel keeps an
    unlinked file's data while it is open).
    """

    def __init__(self, directory: str | None = None, max_size: int | None = None) -> None:
        self.directory = os.path.abspath(directory or default_cache_dir())
        self.max_size = max_size
        # Private unless the directory is group-shared on purpose (setgid): see xnatfs.privacy.
        self.shared = privacy.is_group_shared(self.directory)
        self.dir_mode = privacy.dir_mode(self.shared)
        self.file_mode = privacy.file_mode(self.shared)
        privacy.secure_dir(self.directory, self.shared)
        privacy.secure_dir(os.path.join(self.directory, LAYOUT), self.shared)
        self.stats = CacheStats()
        self._entries: dict[tuple[tuple[str, ...], str], CacheEntry] = {}
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._touched: dict[str, float] = {}

    def entry(self, key: tuple[str, ...], version: str) -> CacheEntry:
        """Return the entry for ``key`` at ``version`` (the same object for the same pair)."""
        with self._lock:
            found = self._entries.get((key, version))
            if found is None:
                found = self._entries[(key, version)] = CacheEntry(self, key, version)
            return found

    def touch(self, entry: CacheEntry) -> None:
        """Record a use of ``entry`` for LRU eviction (on disk at most once a minute per entry)."""
        self.stats.hit()
        now = time.monotonic()
        if now - self._touched.get(entry.path, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        self._touched[entry.path] = now
        with contextlib.suppress(OSError):
            os.utime(entry.meta_path)

    def after_fill(self, entry: CacheEntry) -> None:
        """Drop older versions of the same key, then evict down to ``max_size``."""
        now = time.time()
        for name in os.listdir(entry.folder):
            path = os.path.join(entry.folder, name)
            if name.endswith(".json") and path != entry.meta_path:
                with contextlib.suppress(OSError):
                    if now - os.stat(path).st_mtime >= EVICTION_GRACE_SECONDS:
                        self._remove(path[: -len(".json")])
        if self.max_size is not None:
            self.evict(self.max_size, keep=entry)

    def evict(self, max_size: int, keep: CacheEntry | None = None) -> int:
        """Remove least recently used entries until the cache holds at most ``max_size`` bytes.

        Returns the number of bytes freed.
        """
        with self._evict_lock:
            entries = []
            for meta in self._metas():
                try:
                    with open(meta) as f:
                        size = int(json.load(f)["size"])
                    used = os.stat(meta).st_mtime
                except (OSError, ValueError, KeyError):
                    continue
                entries.append((used, size, meta[: -len(".json")]))
            total = sum(size for _, size, _ in entries)
            freed = 0
            now = time.time()
            for used, size, base in sorted(entries):
                if total <= max_size:
                    break
                if (keep is not None and base == keep.path) or now - used < EVICTION_GRACE_SECONDS:
                    continue
                if self._remove(base):
                    total -= size
                    freed += size
            return freed

    def size(self) -> int:
        """Return the total size in bytes of the complete entries."""
        total = 0
        for meta in self._metas():
            with contextlib.suppress(OSError, ValueError, KeyError), open(meta) as f:
                total += int(json.load(f)["size"])
        return total

    def _metas(self) -> list[str]:
        root = os.path.join(self.directory, LAYOUT)
        if not os.path.isdir(root):
            return []
        found = []
        for key_dir in os.scandir(root):
            if key_dir.is_dir(follow_symlinks=False):
                found += [e.path for e in os.scandir(key_dir.path) if e.name.endswith(".json")]
        return found

    def _remove(self, base: str) -> bool:
        """Remove the entry at ``base`` unless someone is filling it; True if removed."""
        lock_path = base + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            # Rename first so no reader ever sees a half-deleted entry.
            doomed = f"{base}.evicting-{os.getpid()}-{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(base, doomed)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + ".json")
            shutil.rmtree(doomed, ignore_errors=True)
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def _write_meta(self, entry: CacheEntry, size: int) -> None:
        meta = {"key": list(entry.key), "version": entry.version, "size": size, "published": time.time()}
        tmp = f"{entry.meta_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, entry.meta_path)

    def entries(self) -> list[EntryInfo]:
        """Return the complete entries of the cache (any mount, any process), least recently used first."""
        found = []
        for meta in self._metas():
            try:
                with open(meta) as f:
                    data = json.load(f)
                used = os.stat(meta).st_mtime
                found.append(
                    EntryInfo(meta[: -len(".json")], tuple(data["key"]), str(data["version"]), int(data["size"]), used)
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda e: e.last_used)

    def remove(self, base: str) -> bool:
        """Remove the complete entry at ``base`` (an :attr:`EntryInfo.base`) unless a fill holds it.

        Files already open stay readable. Returns True if removed.
        """
        return self._remove(base)
