"""The content side of a transport: the cache of downloaded units, single-flight fills, sizes learned
from content, content units for prefetch and download-ahead across the units of a group. Mixed
into :class:`~xnatfs.transports.base.AbstractTransport`; the transport names units (``_unit``) and
fills them (``_fill``), see :mod:`xnatfs.transports.base`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import threading
from typing import Any

from cachetools import LRUCache, TTLCache

from xnatfs.cache import Cache
from xnatfs.transports.entry import ContentUnit, Entry, Unit, normpath

log = logging.getLogger(__name__)

DEFAULT_PARALLEL_DOWNLOADS = 4
# Set in threads that read ahead, so that their own fetches do not start more reading ahead.
_reading_ahead = threading.local()


class ContentCache:
    """Content of a transport through the cache (see the module's docstring). Needs ``stat``,
    ``walk``, ``changed``, ``_unit``, ``_fill`` and the attributes below."""

    opts: dict[str, Any]
    ttl: float
    timeout: float
    _lock: threading.Lock
    _stats: TTLCache[str, Entry | None]
    _listings: LRUCache[str, Any]

    def _init_content(self, size: int) -> None:
        self._cache: Cache | None = self.opts.get("cache")
        # Where the content of recently opened files is (by entry key), so a repeat open skips the lookups.
        # Short-lived: cache entries record their use (for eviction) only when looked up.
        self._local: TTLCache[str, str] = TTLCache(maxsize=size, ttl=min(self.ttl, 30.0))
        # Sizes learned from content where the listing's was wrong or missing, by (entry key, listed size).
        self._true_sizes: LRUCache[tuple[str, int | None], int] = LRUCache(maxsize=100_000)
        # Reading ahead: the last unit read per group, the groups already read ahead, the download pool.
        self._parallel_downloads = int(self.opts.get("parallel_downloads", DEFAULT_PARALLEL_DOWNLOADS))
        self._last_unit: LRUCache[str, str] = LRUCache(maxsize=1024)
        self._read_ahead_groups: LRUCache[str, bool] = LRUCache(maxsize=1024)
        self._download_slots = threading.BoundedSemaphore(max(1, self._parallel_downloads))

    @property
    def cache(self) -> Cache:
        """Return the cache of downloaded content: option ``cache``, else one in ``cache_dir``
        (default :func:`~xnatfs.cache.default_cache_dir`) capped at ``cache_size`` bytes.
        Built once, on first use (a transport whose content is local never builds one)."""
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = Cache(self.opts.get("cache_dir"), self.opts.get("cache_size"))
        return self._cache

    @cache.setter
    def cache(self, cache: Cache) -> None:
        self._cache = cache

    def _fetch(self, path: str, entry: Entry) -> str:
        """Return the path of a local file holding the complete content of file ``path``.

        ``entry`` is the file's entry from its folder's listing. By default the file's unit is
        filled into the cache (once); a transport whose content is local overrides this. May block
        until the content has arrived; never returns a partial file.
        """
        unit = self._unit(path, entry)
        if unit is None:
            raise IsADirectoryError(path)
        self._note_read(unit)
        local = self.cache.entry(unit.key, unit.version).get(
            unit.member, lambda filler: self._fill(unit, filler), timeout=self.timeout
        )
        self._learn_size(path, entry, local)
        return local

    def _sized(self, path: str, entry: Entry) -> Entry:
        """Return ``entry`` with its size when it was listed without one and its content is in the
        cache (complete or staged), else as it is. Looked up on every call, locally: a size appears
        as soon as a fill has brought the file, without another listing request."""
        if entry.is_dir or entry.size is not None:
            return entry
        unit = self._unit(path, entry)
        local = None if unit is None else self.cache.entry(unit.key, unit.version).staged_path(unit.member)
        if local is None:
            return entry
        try:
            return dataclasses.replace(entry, size=os.stat(local).st_size)
        except OSError:  # evicted or published between the two calls
            return entry

    def fetch(self, path: str) -> str:
        """Return the path of a local file with the complete content of ``path``.

        Raises FileNotFoundError, IsADirectoryError, or an XnatfsError with the cause.
        """
        path = normpath(path)
        return self._content(path, self.stat(path))

    def _content(self, path: str, entry: Entry) -> str:
        """Return the local file with the content of ``path``, whose entry is ``entry`` (see fetch)."""
        if entry.is_dir:
            raise IsADirectoryError(path)
        return self._fetch(path, entry)

    def _note_read(self, unit: Unit) -> None:
        """Start reading ahead when a reader moves on to a second unit of one group."""
        if unit.group is None or self._parallel_downloads <= 0 or getattr(_reading_ahead, "active", False):
            return
        unit_path, group = unit.folder, unit.group
        with self._lock:
            previous = self._last_unit.get(group)
            self._last_unit[group] = unit_path
            start = previous not in (None, unit_path) and group not in self._read_ahead_groups
            if start:
                self._read_ahead_groups[group] = True
        if start:
            thread = threading.Thread(
                target=self._download_group,
                args=(group, {previous, unit_path}),
                name="xnatfs-download-ahead",
                daemon=True,
            )
            thread.start()

    def _download_group(self, group: str, skip: set[str | None]) -> None:
        """Download the units of ``group`` not in ``skip``, ``parallel_downloads`` at a time.

        Each download is waited for through the unit's last file, so the bound holds for whole units.
        Failures are left to the reader who will need that content (it gets the error then).
        """
        _reading_ahead.active = True
        try:
            last_file: dict[str, str] = {}
            for root, _dirs, files in self.walk(group):
                for name in files:
                    path = f"{root.rstrip('/')}/{name}"
                    unit = self._unit(path, self.stat(path))
                    if unit is not None and unit.folder not in skip:
                        last_file[unit.folder] = max(last_file.get(unit.folder, path), path)
        except Exception as error:  # noqa: BLE001 - reading ahead is an optimisation
            log.debug("reading ahead in %s stopped: %s", group, error)
            return
        # Daemon threads (a stopping mount does not wait for them), each holding a download slot.
        for path in sorted(last_file.values()):
            self._download_slots.acquire()
            threading.Thread(target=self._fetch_ahead, args=(path,), name="xnatfs-download-ahead", daemon=True).start()

    def _fetch_ahead(self, path: str) -> None:
        _reading_ahead.active = True
        try:
            self.fetch(path)
        except Exception as error:  # noqa: BLE001 - the reader who needs it will get the error
            log.debug("reading ahead %s failed: %s", path, error)
        finally:
            self._download_slots.release()

    def open_fd(self, path: str, entry: Entry | None = None) -> int:
        """Return a file descriptor open for reading the complete content of ``path``.

        ``entry`` is the path's entry when the caller has just looked it up (saves a lookup).
        Retries when the content moved between fetch and open (a cache entry being published).
        Raises as :meth:`fetch`.
        """
        path = normpath(path)
        if entry is None:
            entry = self.stat(path)
        key = entry.key or path  # a source's key changes with the content (e.g. its digest)
        with self._lock:
            local = self._local.get(key)
        if local is not None:
            try:
                return os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
        for attempt in range(3):
            local = self._content(path, entry)
            try:
                fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue
            with self._lock:
                self._local[key] = local
            return fd
        raise AssertionError("unreachable")

    def content_unit(self, path: str) -> ContentUnit | None:
        """Return the unit of download that holds file ``path``, or None for a folder or when
        reading it never downloads (local content). Never downloads content (may list). Raises
        FileNotFoundError."""
        path = normpath(path)
        entry = self.stat(path)
        unit = None if entry.is_dir else self._unit(path, entry)
        if unit is None:
            return None
        return ContentUnit(unit.id, unit.folder, self.cache.entry(unit.key, unit.version), unit.member, unit.size)

    def _learn_size(self, path: str, entry: Entry, local: str) -> None:
        """When the content's size differs from the listed one, the bytes win: the listing entry
        gets the true size (kept across re-listings) and, when a size had been told, the change
        listeners (the mount) are told."""
        try:
            size = os.path.getsize(local)
        except OSError:
            return
        with self._lock:
            known = self._true_sizes.get((entry.key, entry.size))
        if size in (entry.size, known):
            return  # as listed, or learned (and told) already: a reader holding the old entry
        if entry.size is not None:
            log.info("%s: listed with %s bytes, has %d: using the downloaded size", path, entry.size, size)
        parent, name = posixpath.split(path)
        with self._lock:
            self._true_sizes[(entry.key, entry.size)] = size
            cached = self._listings.get(parent)
            if cached is not None and name in cached.entries:
                entries = {**cached.entries, name: dataclasses.replace(cached.entries[name], size=size)}
                self._listings[parent] = dataclasses.replace(cached, entries=entries)
            self._stats.pop(path, None)
        if entry.size is not None:
            self.changed(path)

    def _with_true_sizes(self, entries: list[Entry]) -> list[Entry]:
        """Return ``entries`` with the sizes learned from content (see :meth:`_learn_size`)."""
        if not self._true_sizes:
            return entries
        with self._lock:
            found = [self._true_sizes.get((e.key, e.size)) for e in entries]
        return [e if size is None else dataclasses.replace(e, size=size) for e, size in zip(entries, found)]

    def is_cached(self, path: str) -> bool:
        """Return True if reading file ``path`` now would not download (content local or cached)."""
        unit = self.content_unit(path)
        return unit is None or unit.entry is None or unit.entry.staged_path(unit.member) is not None
