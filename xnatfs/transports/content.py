"""The content side of a transport: the cache of downloaded units, single-flight fills, sizes learned
from content, content units for prefetch and download-ahead across the units of a group. Mixed
into :class:`~xnatfs.transports.base.AbstractTransport`; the transport names units (``_unit``) and
fills them (``_fill``), see :mod:`xnatfs.transports.base`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from cachetools import LRUCache

from xnatfs.cache import Cache
from xnatfs.transports.entry import ContentUnit, Entry, Unit, normpath
from xnatfs.transports.executor import BoundedExecutor
from xnatfs.transports.state import TransportState

log = logging.getLogger(__name__)

DEFAULT_PARALLEL_DOWNLOADS = 4


class ContentCache(TransportState):
    """Content of a transport through the cache (see the module's docstring). Needs ``stat``,
    ``walk``, ``_correct_size``, ``_unit`` and ``_fill``."""

    def _init_content(self) -> None:
        self._cache: Cache | None = self.opts.get("cache")
        # Download-ahead: the last unit read per group, the groups already read ahead, and the
        # executor that walks those groups and downloads their units, parallel_downloads at a time.
        self._last_unit: LRUCache[str, str] = LRUCache(maxsize=1024)
        self._read_ahead_groups: LRUCache[str, bool] = LRUCache(maxsize=1024)
        parallel = int(self.opts.get("parallel_downloads", DEFAULT_PARALLEL_DOWNLOADS))
        self._download_pool = BoundedExecutor(parallel, "xnatfs-download-ahead")

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
        if unit.group is None or self._download_pool.workers <= 0 or self._download_pool.in_worker():
            return  # (reading ahead does not start more reading ahead)
        unit_path, group = unit.folder, unit.group
        with self._lock:
            previous = self._last_unit.get(group)
            self._last_unit[group] = unit_path
            start = previous not in (None, unit_path) and group not in self._read_ahead_groups
            if start:
                self._read_ahead_groups[group] = True
        if start:
            self._download_pool.submit(group, self._download_group, group, {previous, unit_path})

    def _download_group(self, group: str, skip: set[str | None]) -> None:
        """Download the units of ``group`` not in ``skip`` (each through its last file).

        Failures are left to the reader who will need that content (it gets the error then).
        """
        last_file: dict[str, str] = {}
        for root, _dirs, files in self.walk(group):
            for name in files:
                path = f"{root.rstrip('/')}/{name}"
                unit = self._unit(path, self.stat(path))
                if unit is not None and unit.folder not in skip:
                    last_file[unit.folder] = max(last_file.get(unit.folder, path), path)
        for path in sorted(last_file.values()):
            self._download_pool.submit(path, self.fetch, path)

    def open_fd(self, path: str, entry: Entry | None = None) -> int:
        """Return a file descriptor open for reading the complete content of ``path``.

        ``entry`` is the path's entry when the caller has just looked it up (saves a lookup).
        Retries when the content moved between fetch and open (a cache entry being published).
        Raises as :meth:`fetch`.
        """
        path = normpath(path)
        if entry is None:
            entry = self.stat(path)
        for attempt in range(3):
            local = self._content(path, entry)
            try:
                return os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if attempt == 2:
                    raise
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
        gets the true size (see ``_correct_size``) and, when a size had been told, the change
        listeners (the mount) are told."""
        try:
            size = os.path.getsize(local)
        except OSError:
            return
        if not self._correct_size(path, entry, size) or entry.size is None:
            return
        log.info("%s: listed with %s bytes, has %d: using the downloaded size", path, entry.size, size)
        self.changed(path)

    def is_cached(self, path: str) -> bool:
        """Return True if reading file ``path`` now would not download (content local or cached)."""
        unit = self.content_unit(path)
        return unit is None or unit.entry is None or unit.entry.staged_path(unit.member) is not None
