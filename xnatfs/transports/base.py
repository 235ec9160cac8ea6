"""The transport contract: a few primitives per source, everything else derived here once.

A transport presents a source (an XNAT server, a local folder, a DICOM PACS) as a tree of folders
and files. Writing one means:

* metadata: the class attributes ``name``, ``description``, ``authors``, ``version``, ``url``,
  ``schemes`` (and ``sizes_known``, ``persistent_catalog``, ``default_ttl`` where they differ);
* :meth:`AbstractTransport._setup` (optional) -- check the arguments and ``self.opts``, connect;
* :meth:`AbstractTransport._list` -- the entries of one folder, with sizes and dates (and,
  optionally, :meth:`AbstractTransport._lookup` -- one path's entry, where the source can look it
  up cheaper than by listing its parent);
* content, one of:

  - :meth:`AbstractTransport._unit` -- the :class:`Unit` of content that holds a file (what one
    download brings: an XNAT resource, a DICOM series), and :meth:`AbstractTransport._fill` --
    write that unit's members into a :class:`~xnatfs.cache.Filler` (``filler.write(member, data)``
    writes one atomically and announces it);
  - or :meth:`AbstractTransport._fetch` -- a local path already holding the file (a local folder).

The base class owns the rest: the cache (:attr:`AbstractTransport.cache`, built once from the
options), single-flight fills (one download per unit, however many readers and processes ask),
member lookup, sizes learned from content (a listed size that was wrong, or not known), the
listing cache with stale fallback, the persistent catalog and listing read-ahead
(:mod:`xnatfs.transports.listings`), download-ahead across the units of a group, content units for
prefetch, and the derived methods the mount, the download API and the CLI use: :meth:`listdir`,
:meth:`stat`, :meth:`exists`, :meth:`isfile`, :meth:`isdir`, :meth:`walk`, :meth:`info`,
:meth:`open` and :meth:`fetch`. ``exists``/``isfile``/``isdir`` answer False for any OSError.

Download-ahead: when a reader moves on to a second unit of one group (``Unit.group``, e.g. an
experiment for ``cp -r``), the group's other units are downloaded in the background, a bounded
number at a time (option ``parallel_downloads``, default 4; 0 turns it off).

Paths are tree paths: absolute, ``/``-separated, as seen on the mount (``/P/S/E/scans``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import posixpath
import queue
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

from cachetools import LRUCache, TTLCache

from xnatfs.cache import Cache, Filler
from xnatfs.catalog import Catalog
from xnatfs.exceptions import ConnectionFailedError, ServerError, XnatfsError

log = logging.getLogger(__name__)

DEFAULT_LISTING_JOBS = 6
# After the source failed to answer a listing, stale listings are served without asking it for this long.
DOWN_RETRY_SECONDS = 10.0
DEFAULT_PARALLEL_DOWNLOADS = 4
# Set in threads that read ahead, so that their own fetches do not start more reading ahead.
_reading_ahead = threading.local()


class NoOtherInstance(Exception):
    """Raised where a transport allows a single instance and another one exists."""


class RootIsNotDirectory(XnatfsError, NotADirectoryError):
    """The root of a transport opened with ``read_directory_only`` is not a folder."""


class AssociationNotEstablished(XnatfsError, ConnectionError):
    """A DICOM association could not be established (peer down, rejected, timed out)."""


class AssociationFailed(XnatfsError):
    """A DICOM operation ended with a failure status (or the association broke during it)."""


# Names that file managers and shells probe for in every folder. They never exist in an archive,
# so they are answered ENOENT without asking the source.
PROBE_NAMES = frozenset(
    {
        ".hidden",
        ".DS_Store",
        "._.DS_Store",
        "desktop.ini",
        "Desktop.ini",
        "autorun.inf",
        "Thumbs.db",
        ".directory",
        ".localized",
        ".git",
        ".svn",
        ".hg",
        ".xdg-volume-info",
        ".Spotlight-V100",
        ".metadata_never_index",
        ".ql_disablethumbnails",
        ".ql_disablecache",
    }
)
PROBE_PREFIXES = (".Trash", "._", ".~lock.", ".goutputstream")


def is_probe_name(name: str) -> bool:
    """Return True for a name that file managers probe for and that no archive holds."""
    return name in PROBE_NAMES or name.startswith(PROBE_PREFIXES)


@dataclass(frozen=True)
class Entry:
    """One folder or file of a transport's tree.

    ``size`` is the file size in bytes (``None`` while unknown, e.g. a PACS series not yet
    retrieved); ``mtime`` seconds since the epoch; ``key`` a stable identity from the source
    (server IDs) used for inode numbers; ``ref`` whatever the transport needs to find the object
    again (not shown to users).
    """

    name: str
    is_dir: bool
    size: int | None = 0
    mtime: float = 0.0
    key: str = ""
    ref: Any = field(default=None, compare=False, repr=False)

    @property
    def mode(self) -> int:
        """Return ``st_mode`` for a read-only entry."""
        return (stat_module.S_IFDIR | 0o555) if self.is_dir else (stat_module.S_IFREG | 0o444)


ROOT = Entry(name="", is_dir=True, key="/")


@dataclass(frozen=True)
class Unit:
    """The unit of content that holds a file: what one fill brings into one cache entry (an XNAT
    resource, a DICOM series). Returned by :meth:`AbstractTransport._unit`.

    ``key`` and ``version`` name the cache entry (a new version is new content); ``member`` is the
    file's path inside it; ``id`` identifies the unit to users and logs (e.g. a REST path);
    ``folder`` is the unit's folder in the tree; ``group`` a folder whose units a reader walking it
    wants one after the other (None: no download-ahead); ``size`` the bytes of the whole unit when
    listed; ``ref`` whatever :meth:`AbstractTransport._fill` needs.
    """

    key: tuple[str, ...]
    version: str
    member: str
    id: str
    folder: str
    group: str | None = None
    size: int | None = None
    ref: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ContentUnit:
    """The unit of download that holds a file (an XNAT resource, a PACS series): reading any of
    its files fills all of them into one cache entry.

    ``id`` identifies the unit (e.g. the resource's REST path), ``label`` is shown to users (the
    unit's folder in the tree), ``entry`` is its cache entry (a :class:`~xnatfs.cache.CacheEntry`)
    and ``member`` the file's path inside it, ``size`` the bytes of the whole unit when listed.
    """

    id: str
    label: str
    entry: Any
    member: str
    size: int | None = None


@dataclass(frozen=True)
class _Listing:
    """A folder's entries by name, when they were fetched (epoch seconds), and whether they came
    from the persistent catalog without being revalidated since."""

    entries: dict[str, Entry]
    fetched: float
    from_catalog: bool = False


class AbstractTransport:
    """Base class of every transport.

    Subclasses set the plug-in metadata (``name``, ``description``, ``authors``, ``version``,
    ``url``, ``schemes``) and implement :meth:`_list` and :meth:`_fetch`; a writable transport
    also implements :meth:`_open_write`.

    Options (``opts``) understood by every transport: ``ttl`` (seconds a listing is trusted,
    default 60), ``listing_cache_size`` (folders kept in memory, default 100,000), ``listing_jobs``
    (listing requests in flight at most, for read-ahead and callers together; default 6),
    ``catalog`` (True, or a folder: keep every listing on disk, see :mod:`xnatfs.catalog`; True
    puts it in the ``cache``'s folder), ``offline`` (never contact the source: listings from the
    catalog only).
    """

    name: ClassVar[str] = "abstract"
    description: ClassVar[str] = ""
    authors: ClassVar[str] = ""
    version: ClassVar[str] = ""
    url: ClassVar[str] = ""
    schemes: ClassVar[list[str]] = []
    # True when every file's size is known from listings. Where it is not (Entry.size None), the mount
    # fetches the file when it is looked up, so the kernel is never told a size a read will not return.
    sizes_known: ClassVar[bool] = True
    # False for sources where a catalog on disk is pointless (a local folder).
    persistent_catalog: ClassVar[bool] = True
    # Seconds a listing is trusted, and a network wait may last, unless the options say otherwise.
    default_ttl: ClassVar[float] = 60.0
    default_timeout: ClassVar[float] = 30.0
    # False where names that file managers probe for may really exist (a local folder).
    hide_probe_names: ClassVar[bool] = True

    def __init__(
        self,
        netloc: str | None = None,
        root: str | None = None,
        mode: str = "r",
        read_directory_only: bool = False,
        opts: dict[str, Any] | None = None,
    ) -> None:
        self.netloc = netloc
        self.root = root
        self.mode = mode
        self.read_directory_only = read_directory_only
        self.opts = dict(opts or {})
        self.ttl = ttl = float(self.opts.get("ttl", self.default_ttl))
        self.timeout = float(self.opts.get("timeout", self.default_timeout))
        size = int(self.opts.get("listing_cache_size", 100_000))
        self.offline = bool(self.opts.get("offline", False))
        # Every listing with the time it was fetched; past the ttl it is revalidated, and it is
        # served as it is when the source cannot be reached: a cached tree stays browsable offline.
        self._listings: LRUCache[str, _Listing] = LRUCache(maxsize=size)
        # stat() results by path (None: no such path), so a lookup is one dict access, not one per level.
        self._stats: TTLCache[str, Entry | None] = TTLCache(maxsize=size, ttl=ttl)
        # Where the content of recently opened files is (by entry key), so a repeat open skips the lookups.
        # Short-lived: cache entries record their use (for eviction) only when looked up.
        self._local: TTLCache[str, str] = TTLCache(maxsize=size, ttl=min(ttl, 30.0))
        self._lock = threading.Lock()
        self._listing_locks: dict[str, threading.Lock] = {}
        # Reading ahead: the last unit read per group, the groups already read ahead, the download pool.
        self._parallel_downloads = int(self.opts.get("parallel_downloads", DEFAULT_PARALLEL_DOWNLOADS))
        self._last_unit: LRUCache[str, str] = LRUCache(maxsize=1024)
        self._read_ahead_groups: LRUCache[str, bool] = LRUCache(maxsize=1024)
        self._download_slots = threading.BoundedSemaphore(max(1, self._parallel_downloads))
        self._change_listeners: list[Callable[[str], None]] = []
        self.listing_jobs = max(int(self.opts.get("listing_jobs") or DEFAULT_LISTING_JOBS), 1)
        # Transports hold one of these around each listing request: it bounds the requests in flight.
        self._listing_slots = threading.BoundedSemaphore(self.listing_jobs)
        # Read-ahead and revalidation run on up to listing_jobs daemon threads (never holding up an exit).
        self._jobs: queue.SimpleQueue[tuple[str, bool] | None] = queue.SimpleQueue()
        self._workers = 0
        self._closed = False
        self._queued: set[str] = set()  # keys waiting for (or in) read-ahead or revalidation
        self._down_until = 0.0  # monotonic time until which the source is taken as unreachable
        self._catalog: Catalog | None = None
        self._unpersistable = False
        self._cache: Cache | None = self.opts.get("cache")
        # Sizes learned from content where the listing's was wrong or missing, by (entry key, listed size).
        self._true_sizes: LRUCache[tuple[str, int | None], int] = LRUCache(maxsize=100_000)
        self._setup()

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

    # -- primitives ---------------------------------------------------------------------------

    def _setup(self) -> None:
        """Set the transport up from its arguments and :attr:`opts` (called once, last thing in the
        constructor). Raises ValueError for arguments the transport cannot serve."""

    def _list(self, path: str) -> list[Entry]:
        """Return the entries of folder ``path``.

        Raises FileNotFoundError (or :class:`~xnatfs.exceptions.NotFoundError`) if it does not
        exist, other :class:`~xnatfs.exceptions.XnatfsError` subclasses when the source fails.
        """
        raise NotImplementedError

    def _unit(self, path: str, entry: Entry) -> Unit | None:
        """Return the :class:`Unit` of content that holds file ``path`` (``entry``: its listing entry).

        Must not download content (may list). None (the default) for content that is local: then
        :meth:`_fetch` is overridden instead.
        """
        return None

    def _fill(self, unit: Unit, filler: Filler) -> None:
        """Write every member of ``unit`` into ``filler.staging``, announcing each once complete
        (``filler.write``, or write-then-rename and ``filler.publish``).

        Called once per unit however many readers ask (the cache runs it). Raises the source's
        error; members announced before the error stay readable by those waiting for them.
        """
        raise NotImplementedError

    def _fetch(self, path: str, entry: Entry) -> str:
        """Return the path of a local file holding the complete content of file ``path``.

        ``entry`` is the file's entry from its folder's listing. By default the file's unit is
        filled into the cache (once); a transport whose content is local overrides this. May block
        until the content has arrived; never returns a partial file.
        """
        unit = self._unit(path, entry)
        if unit is None:
            raise IsADirectoryError(path)
        local = self.cache.entry(unit.key, unit.version).get(
            unit.member, lambda filler: self._fill(unit, filler), timeout=self.timeout
        )
        self._learn_size(path, entry, local)
        return local

    def _open_write(self, path: str, mode: str) -> IO[bytes]:
        """Return a writable file for ``path``; subclasses that can write implement it."""
        raise PermissionError(f"{self.name} transport is read-only")

    def close(self) -> None:
        """Release connections and other resources held by the transport (subclasses call this too)."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, 0
        for _ in range(workers):
            self._jobs.put(None)

    def _check_source(self) -> None:
        """Check that the source answers (and accepts the credentials); raise the error otherwise."""
        self.listdir("/")

    def connect(self) -> str | None:
        """Check the source before a mount; return None when it answers, or a warning when it cannot
        be reached but the catalog can serve (the mount then starts offline and reconnects by itself).

        With ``offline``, the source is never contacted. Raises the source's error (bad
        credentials, unknown host...) when there is no catalog to fall back on, or when the source
        answered and refused; raises XnatfsError for ``offline`` without a catalog.
        """
        catalog = self.catalog
        root = catalog.load("/") if catalog is not None else None
        if self.offline:
            if root is None:
                where = catalog.directory if catalog is not None else "the cache"
                raise XnatfsError(f"--offline: no catalog of {self.catalog_scope()} in {where}")
            return None
        try:
            self._check_source()
        except (ConnectionError, TimeoutError, ServerError) as error:
            if root is None or (isinstance(error, ServerError) and (error.status or 500) < 500):
                raise
            self.source_down()
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(root[0]))
            return f"{error}; mounted offline from the catalog (listed {when}), reconnecting by itself"
        return None

    # -- derived ------------------------------------------------------------------------------

    def listdir(self, path: str = "/") -> list[Entry]:
        """Return the entries of folder ``path`` (cached for ``ttl`` seconds, and in the catalog).

        Concurrent calls for one folder make one request. When the source cannot be reached, the
        last listing of the folder is returned if there is one. The listings the sub-folders will
        need are then fetched ahead, in parallel (see :meth:`_readahead_keys`).
        """
        path = normpath(path)
        listing = self._listing(path)
        self._read_ahead(path, listing)
        if self.sizes_known:
            return list(listing.values())
        return [self._sized(posixpath.join(path, e.name), e) for e in listing.values()]

    def stat(self, path: str) -> Entry:
        """Return the entry of ``path``, from its parent's listing. Raises FileNotFoundError."""
        path = normpath(path)
        with self._lock:
            entry = self._stats.get(path, self)
        if entry is self:  # not cached
            entry = self._lookup(path)
            with self._lock:
                self._stats[path] = entry
        if entry is None:
            raise FileNotFoundError(path)
        return entry if entry.size is not None else self._sized(path, entry)

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

    def _lookup(self, path: str) -> Entry | None:
        """Return the entry of ``path`` (None: there is none), from its parent's listing.

        A primitive a transport may override where the source can look one path up directly (a
        local folder). Raises NotADirectoryError when a parent is a file.
        """
        if path == "/":
            return ROOT
        parent, name = posixpath.split(path)
        if self.hide_probe_names and is_probe_name(name):
            return None
        parent_entry = self.stat(parent)
        if not parent_entry.is_dir:
            raise NotADirectoryError(parent)
        return self._listing(parent).get(name)

    def exists(self, path: str) -> bool:
        """Return True if ``path`` is a folder or file of the tree."""
        try:
            self.stat(path)
        except OSError:
            return False
        return True

    def isfile(self, path: str) -> bool:
        """Return True if ``path`` is a file."""
        try:
            return not self.stat(path).is_dir
        except OSError:
            return False

    def isdir(self, path: str) -> bool:
        """Return True if ``path`` is a folder."""
        try:
            return self.stat(path).is_dir
        except OSError:
            return False

    def walk(self, top: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """Yield ``(root, dirs, files)`` for every folder below ``top``, top-down, like ``os.walk``.

        Removing names from ``dirs`` prunes the walk.
        """
        top = normpath(top)
        entries = self.listdir(top)
        dirs = [e.name for e in entries if e.is_dir]
        files = [e.name for e in entries if not e.is_dir]
        yield top, dirs, files
        for name in dirs:
            yield from self.walk(posixpath.join(top, name))

    def info(self, path: str) -> str:
        """Return a one-line description of ``path``."""
        entry = self.stat(path)
        if entry.is_dir:
            return f"{path}: folder"
        size = "size unknown" if entry.size is None else f"{entry.size} bytes"
        return f"{path}: file, {size}"

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
        if self._parallel_downloads > 0 and not getattr(_reading_ahead, "active", False):
            self._note_read(path, entry)
        return self._fetch(path, entry)

    def _note_read(self, path: str, entry: Entry) -> None:
        """Start reading ahead when a reader moves on to a second unit of one group."""
        unit = self._unit(path, entry)
        if unit is None or unit.group is None:
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

    def open(self, path: str, mode: str = "r") -> IO[bytes]:
        """Open ``path`` in binary ``mode``: ``r`` reads; ``w``, ``x`` and ``a`` write where supported."""
        base = mode.replace("b", "")
        if base == "r":
            return io.FileIO(self.open_fd(path), "r", closefd=True)
        if base in ("w", "x", "a"):
            if "r" in self.mode and not any(m in self.mode for m in "wxa"):
                raise PermissionError(f"{self.name} transport opened read-only (mode {self.mode!r})")
            stream = self._open_write(normpath(path), base)
            self.invalidate(posixpath.dirname(normpath(path)))
            return stream
        raise ValueError(f"unsupported mode {mode!r}")

    def invalidate(self, path: str | None = None) -> None:
        """Forget the cached listing of folder ``path`` (of every folder when None)."""
        with self._lock:
            self._stats.clear()
            self._local.clear()
            if path is None:
                self._listings.clear()
            else:
                self._listings.pop(normpath(path), None)
        if path is not None and self.catalog is not None:
            self.catalog.forget(normpath(path))

    def add_change_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(path)`` whenever what was said about ``path`` changes after the fact
        (e.g. a size learned from downloaded content). The mount uses it to make the kernel drop
        the attributes and pages it keeps for that path."""
        self._change_listeners.append(listener)

    def changed(self, path: str) -> None:
        """Forget what is cached about ``path`` here and tell the change listeners.

        A transport calls it when an entry's attributes turn out different from what it listed.
        """
        path = normpath(path)
        with self._lock:
            self._stats.pop(path, None)
            self._local.clear()
        for listener in list(self._change_listeners):
            try:
                listener(path)
            except Exception as error:  # a listener must not break the read that found the change
                log.warning("%s: change listener failed: %s", path, error)

    # -- what the source says about a path (xattrs, prefetch, status) ---------------------------

    def metadata(self, path: str) -> dict[str, str]:
        """Return what the source says about ``path``, as extended attribute names without the
        ``user.`` prefix (``{"xnat.uri": "/data/experiments/E1", "xnat.id": "E1"}``).

        Comes from listings only, never downloads content. The base transport says nothing.
        Raises FileNotFoundError.
        """
        self.stat(path)
        return {}

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
        if size == entry.size:
            return
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

    def ping(self) -> bool:
        """Return True if the source answers a listing of its root now (not from the listing cache)."""
        try:
            self._list("/")
        except Exception as error:  # any failure means "not reachable" to a status display
            log.debug("ping failed: %s", error)
            return False
        return True

    # -- listing cache ------------------------------------------------------------------------

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
                self._local.clear()
            self.changed(path)
        return listing

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

    # -- read-ahead ---------------------------------------------------------------------------

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
        with self._lock:
            if key in self._queued or self._closed:
                return
            self._queued.add(key)
            start = self._workers < self.listing_jobs
            if start:
                self._workers += 1
        self._jobs.put((key, revalidate))
        if start:
            threading.Thread(target=self._work, name="xnatfs-listing", daemon=True).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._background(*job)

    def _background(self, key: str, revalidate: bool) -> None:
        try:
            if revalidate:
                with self._lock:
                    stale = self._listings.get(key)
                self._refresh(key, stale)
            else:
                self._listing(key)
        except Exception as error:
            log.debug("%s: read-ahead failed: %s", key, error)
        finally:
            with self._lock:
                self._queued.discard(key)

    def __enter__(self) -> AbstractTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normpath(path: str) -> str:
    """Return ``path`` as an absolute tree path without ``.``/``..``/duplicate separators."""
    path = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if path in ("/", "//") else path
