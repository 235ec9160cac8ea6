"""The listing cache of a transport: every folder listed once per ``ttl``, kept in memory and in the
persistent catalog (:mod:`xnatfs.catalog`), served stale while the source is down, corrected by the
sizes learned from content, with the listings a walk will need next fetched ahead in parallel. Mixed into
:class:`~xnatfs.transports.base.AbstractTransport`.

Keys are folder paths, or a transport's own bulk listings (keys that are not paths): both are
cached, persisted and read ahead the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from cachetools import LRUCache

from xnatfs.catalog import Catalog
from xnatfs.exceptions import ConnectionFailedError, XnatfsError
from xnatfs.options import LISTING_JOBS
from xnatfs.transports.entry import Entry
from xnatfs.transports.executor import BoundedExecutor
from xnatfs.transports.state import TransportState

log = logging.getLogger(__name__)

DEFAULT_LISTING_JOBS = LISTING_JOBS
# After the source failed to answer a listing, stale listings are served without asking it for this long.
DOWN_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class _Listing:
    """A folder's entries by name, when they were fetched (epoch seconds), and whether they came
    from the persistent catalog without being revalidated since."""

    entries: dict[str, Entry]
    fetched: float
    from_catalog: bool = False


class ListingCache(TransportState):
    """Listings of a transport, cached (see the module's docstring). Needs ``_list`` (the
    transport's primitive)."""

    persistent_catalog: ClassVar[bool]

    def _init_listings(self, size: int) -> None:
        # Every listing with the time it was fetched; past the ttl it is revalidated, and it is
        # served as it is when the source cannot be reached: a cached tree stays browsable offline.
        self._listings: LRUCache[str, _Listing] = LRUCache(maxsize=size)
        self._listing_locks: dict[str, threading.Lock] = {}
        # Sizes learned from content where the listing's was wrong or missing, by (entry key, listed size).
        self._true_sizes: LRUCache[tuple[str, int | None], int] = LRUCache(maxsize=100_000)
        self.listing_jobs = max(int(self.opts.get("listing_jobs") or DEFAULT_LISTING_JOBS), 1)
        # Transports hold one of these around each listing request: it bounds the requests in flight.
        self._listing_slots = threading.BoundedSemaphore(self.listing_jobs)
        # Read-ahead and revalidation: one job per listing key at a time.
        self._listing_pool = BoundedExecutor(self.listing_jobs, "xnatfs-listing")
        self._down_until = 0.0  # monotonic time until which the source is taken as unreachable
        self._catalog: Catalog | None = None
        self._unpersistable = False

    @property
    def catalog(self) -> Catalog | None:
        """Return the persistent catalog (None when disabled). Created on first use, since its
        scope (source and user) is known only once the subclass has set itself up."""
        if self._catalog is None and self.persistent_catalog:
            where = self.opts.get("catalog")
            if where is True:
                cache = self.opts.get("cache")
                where = getattr(cache, "directory", None) or self.opts.get("cache_dir")
            if where:
                self._catalog = Catalog(str(where), self.catalog_scope())
        return self._catalog

    def catalog_scope(self) -> str:
        """Return what identifies this source as seen by this user, e.g. ``xnat|https://host|alice``."""
        source = self.opts.get("url") or f"{self.netloc or ''}{self.root or ''}"
        return f"{self.name}|{source}|{self.opts.get('user') or ''}"

    def _encode_ref(self, ref: Any) -> Any:
        """Return ``ref`` as plain JSON data for the catalog (raise TypeError if it cannot be)."""
        if ref is None or isinstance(ref, (str, int, float, bool, list, dict)):
            return ref
        raise TypeError(f"{type(ref).__name__} refs are not JSON")

    def _decode_ref(self, data: Any) -> Any:
        """Return the ref that :meth:`_encode_ref` turned into ``data``."""
        return data

    def _listing(self, path: str) -> dict[str, Entry]:
        """Return the entries of ``path`` by name: from memory or the catalog while fresh, else
        fetched (one request for concurrent callers). A stale listing from the catalog is served at
        once and revalidated in the background; a stale one is served as it is while the source is
        down. Keys other than folder paths (a transport's bulk listings) work the same way."""
        cached = self._cached(path)
        now = time.time()
        if cached is not None and now - cached.fetched < self.ttl:
            return cached.entries
        if cached is not None and (self.offline or time.monotonic() < self._down_until):
            return cached.entries
        if cached is not None and cached.from_catalog:
            self._submit(path, revalidate=True)
            return cached.entries
        if self.offline:
            raise ConnectionFailedError(f"{path}: not in the catalog, and the mount is offline")
        self.check_not_down(path)
        return self._refresh(path, cached)

    def check_not_down(self, what: str) -> None:
        """Raise ConnectionFailedError at once while the source is taken as unreachable (for a few
        seconds after it failed to answer), so that a walk or a batch of reads of uncached data does
        not wait ``timeout`` seconds per item; the first request after that tries again."""
        left = self._down_until - time.monotonic()
        if left > 0:
            raise ConnectionFailedError(f"{what}: the source did not answer; trying again in {left:.0f} s")

    def source_down(self) -> None:
        """Record that the source failed to answer (see :meth:`check_not_down`)."""
        self._down_until = time.monotonic() + DOWN_RETRY_SECONDS

    def _cached(self, path: str) -> _Listing | None:
        """Return the listing of ``path`` from memory, else from the catalog (then kept in memory)."""
        with self._lock:
            cached = self._listings.get(path)
        if cached is not None or self.catalog is None:
            return cached
        stored = self.catalog.load(path)
        if stored is None:
            return None
        fetched, rows = stored
        try:
            entries = {}
            for name, is_dir, size, mtime, key, ref in rows:
                entries[name] = Entry(str(name), bool(is_dir), size, float(mtime), str(key), self._decode_ref(ref))
        except (TypeError, ValueError, KeyError) as error:
            log.info("catalog: ignoring the listing of %s (%s)", path, error)
            return None
        cached = _Listing(entries, fetched, from_catalog=True)
        with self._lock:
            self._listings.setdefault(path, cached)
            return self._listings[path]

    def _refresh(self, path: str, stale: _Listing | None) -> dict[str, Entry]:
        """Fetch the listing of ``path`` from the source and keep it (memory and catalog).

        Concurrent calls for one path make one request. On a connection failure ``stale`` is served
        when there is one.
        """
        with self._lock:
            folder_lock = self._listing_locks.setdefault(path, threading.Lock())
        with folder_lock:
            with self._lock:
                cached = self._listings.get(path)
            if cached is not None and not cached.from_catalog and time.time() - cached.fetched < self.ttl:
                return cached.entries  # fetched meanwhile by another caller
            try:
                fetched = time.time()
                entries = self._with_true_sizes(self._list(path))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                raise
            except (XnatfsError, ConnectionError, TimeoutError) as error:
                if isinstance(error, (ConnectionError, TimeoutError)):
                    self.source_down()
                if stale is None:
                    raise
                log.warning("%s: serving the last listing, the source failed: %s", path, error)
                return stale.entries
            self._down_until = 0.0
            listing = {e.name: e for e in entries}
            with self._lock:
                self._listings[path] = _Listing(listing, fetched)
                self._listing_locks.pop(path, None)
            self._persist(path, fetched, entries)
        if stale is not None and stale.from_catalog and stale.entries != listing and path.startswith("/"):
            # A remount served the old listing first: what the kernel was told may be out of date.
            with self._lock:
                self._stats.clear()
            self.changed(path)
        return listing

    def _correct_size(self, path: str, entry: Entry, size: int) -> bool:
        """Record that file ``path``, listed as ``entry``, holds ``size`` bytes: the listing entry
        gets the true size, kept across re-listings while the source lists it as before. Returns
        True when that is news (neither as listed nor learned before)."""
        with self._lock:
            if size in (entry.size, self._true_sizes.get((entry.key, entry.size))):
                return False
            self._true_sizes[(entry.key, entry.size)] = size
            parent, name = posixpath.split(path)
            cached = self._listings.get(parent)
            if cached is not None and name in cached.entries:
                entries = {**cached.entries, name: dataclasses.replace(cached.entries[name], size=size)}
                self._listings[parent] = dataclasses.replace(cached, entries=entries)
            self._stats.pop(path, None)
        return True

    def _with_true_sizes(self, entries: list[Entry]) -> list[Entry]:
        """Return ``entries`` with the sizes learned from content (see :meth:`_correct_size`)."""
        if not self._true_sizes:
            return entries
        with self._lock:
            found = [self._true_sizes.get((e.key, e.size)) for e in entries]
        return [e if size is None else dataclasses.replace(e, size=size) for e, size in zip(entries, found)]

    def _persist(self, path: str, fetched: float, entries: list[Entry]) -> None:
        """Write a listing to the catalog (not at all when its refs cannot be encoded)."""
        catalog = self.catalog
        if catalog is None or self._unpersistable:
            return
        try:
            rows = [[e.name, e.is_dir, e.size, e.mtime, e.key, self._encode_ref(e.ref)] for e in entries]
            catalog.store(path, fetched, rows)
        except (TypeError, ValueError) as error:
            log.info("catalog: listings of %s are kept in memory only (%s)", self.name, error)
            self._unpersistable = True

    def _readahead_keys(self, path: str, entries: dict[str, Entry]) -> list[str]:
        """Return the listings to fetch ahead once folder ``path`` has been listed by a caller.

        Default: the listings of its sub-folders. A transport may name instead the listings its
        sub-folders' listings are made of (e.g. bulk listings). Never more than one level: read-ahead
        does not trigger read-ahead.
        """
        return [posixpath.join(path, e.name) for e in entries.values() if e.is_dir]

    def _read_ahead(self, path: str, entries: dict[str, Entry]) -> None:
        if self.offline or time.monotonic() < self._down_until:
            return
        try:
            keys = self._readahead_keys(path, entries)
        except Exception as error:  # read-ahead is an optimisation; never fail the listing for it
            log.debug("%s: no read-ahead: %s", path, error)
            return
        now = time.time()
        for key in keys:
            with self._lock:
                cached = self._listings.get(key)
            if cached is not None and now - cached.fetched < self.ttl:
                continue
            self._submit(key)

    def _submit(self, key: str, revalidate: bool = False) -> None:
        """Fetch listing ``key`` in the background (once at a time per key)."""
        self._listing_pool.submit(key, self._background, key, revalidate)

    def _background(self, key: str, revalidate: bool) -> None:
        if revalidate:
            with self._lock:
                stale = self._listings.get(key)
            self._refresh(key, stale)
        else:
            self._listing(key)
