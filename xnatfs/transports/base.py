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
options; the one place that knows where content is: a read looks its path up once, in the listings,
and its unit's member in the cache), single-flight fills (one download per unit, however many
readers and processes ask), member lookup, sizes learned from content (a listed size that was
wrong, or not known), the listing cache with stale fallback, the persistent catalog
and listing read-ahead (:mod:`xnatfs.transports.listings`), download-ahead across the units of a
group and content units for prefetch (:mod:`xnatfs.transports.content`), and the derived methods
the mount, the download API and the CLI use: :meth:`listdir`, :meth:`stat`, :meth:`exists`,
:meth:`isfile`, :meth:`isdir`, :meth:`walk`, :meth:`info`, :meth:`open` and :meth:`fetch`.
``exists``/``isfile``/``isdir`` answer False for any OSError.

Background work runs on two bounded executors (:mod:`xnatfs.transports.executor`), never on a
thread per item: listing read-ahead and revalidation on ``listing_jobs`` threads at most, and
download-ahead on ``parallel_downloads``: when a reader moves on to a second unit of one group
(``Unit.group``, e.g. an experiment for ``cp -r``), the group is walked and its other units are
downloaded in the background (option ``parallel_downloads``, default 4; 0 turns it off).

Paths are tree paths: absolute, ``/``-separated, as seen on the mount (``/P/S/E/scans``).
"""

from __future__ import annotations

import io
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, ClassVar

from cachetools import TTLCache

from xnatfs.cache import Filler
from xnatfs.exceptions import ServerError, XnatfsError
from xnatfs.options import TIMEOUT, TTL
from xnatfs.transports.content import ContentCache
from xnatfs.transports.entry import (  # noqa: F401 - names this module has always exported
    PROBE_NAMES,
    PROBE_PREFIXES,
    ROOT,
    ContentUnit,
    Entry,
    Unit,
    is_probe_name,
    normpath,
)
from xnatfs.transports.listings import DEFAULT_LISTING_JOBS, DOWN_RETRY_SECONDS, ListingCache  # noqa: F401

log = logging.getLogger(__name__)

CONNECT_CHECK_SECONDS = 3.0  # how long a mount with a catalog to serve from tries to reach the source


class NoOtherInstance(Exception):
    """Raised where a transport allows a single instance and another one exists."""


class RootIsNotDirectory(XnatfsError, NotADirectoryError):
    """The root of a transport opened with ``read_directory_only`` is not a folder."""


class AssociationNotEstablished(XnatfsError, ConnectionError):
    """A DICOM association could not be established (peer down, rejected, timed out)."""


class AssociationFailed(XnatfsError):
    """A DICOM operation ended with a failure status (or the association broke during it)."""


class AbstractTransport(ListingCache, ContentCache):
    """Base class of every transport.

    Subclasses set the plug-in metadata (``name``, ``description``, ``authors``, ``version``,
    ``url``, ``schemes``) and implement the primitives of the module's docstring: :meth:`_list`,
    and :meth:`_unit` with :meth:`_fill` (or :meth:`_fetch`); a writable transport also implements
    :meth:`_open_write`.

    Options (``opts``) understood by every transport: ``ttl`` (seconds a listing is trusted,
    default 60), ``timeout`` (seconds a network wait may last, default 30), ``listing_cache_size``
    (folders kept in memory, default 100,000), ``listing_jobs`` (listing requests in flight at
    most, for read-ahead and callers together; default 6), ``parallel_downloads`` (units downloaded
    ahead at a time, default 4), ``cache`` (a :class:`~xnatfs.cache.Cache`) or ``cache_dir`` and
    ``cache_size``, ``catalog`` (True, or a folder: keep every listing on disk, see
    :mod:`xnatfs.catalog`; True puts it in the ``cache``'s folder), ``offline`` (never contact the
    source: listings from the catalog only).
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
    default_ttl: ClassVar[float] = TTL
    default_timeout: ClassVar[float] = TIMEOUT
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
        self.ttl = float(self.opts.get("ttl", self.default_ttl))
        self.timeout = float(self.opts.get("timeout", self.default_timeout))
        self.offline = bool(self.opts.get("offline", False))
        self._lock = threading.Lock()
        self._change_listeners: list[Callable[[str], None]] = []
        size = int(self.opts.get("listing_cache_size", 100_000))
        # stat() results by path (None: no such path), so a lookup is one dict access, not one per level.
        self._stats: TTLCache[str, Entry | None] = TTLCache(maxsize=size, ttl=self.ttl)
        self._init_listings(size)
        self._init_content()
        self._setup()

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

    def _open_write(self, path: str, mode: str) -> IO[bytes]:
        """Return a writable file for ``path``; subclasses that can write implement it."""
        raise PermissionError(f"{self.name} transport is read-only")

    def close(self) -> None:
        """Release connections and other resources held by the transport (subclasses call this too)."""
        self._listing_pool.shutdown()
        self._download_pool.shutdown()

    def _check_source(self, within: float | None = None) -> None:
        """Check that the source answers (and accepts the credentials); raise the error otherwise.

        ``within``: give up reaching the source after about that many seconds (None: ``timeout``).
        This base check lists the root: with a catalog that answers at once (and the source is asked
        again in the background), so it never waits; a transport that must reach its source (a login)
        overrides it and bounds that by ``within``.
        """
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
        # With a catalog to serve from, a source that cannot be reached is not waited for: the mount
        # starts offline at once and reconnects by itself (a server that answers slowly is waited for).
        within = self.timeout if root is None else min(self.timeout, CONNECT_CHECK_SECONDS)
        try:
            self._check_source(within)
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
            if path is None:
                self._listings.clear()
            else:
                self._listings.pop(normpath(path), None)
        if path is not None and self.catalog is not None:
            self.catalog.forget(normpath(path))

    # -- what the source says about a path (xattrs, prefetch, status) ---------------------------

    def metadata(self, path: str) -> dict[str, str]:
        """Return what the source says about ``path``, as extended attribute names without the
        ``user.`` prefix (``{"xnat.uri": "/data/experiments/E1", "xnat.id": "E1"}``).

        Comes from listings only, never downloads content. The base transport says nothing.
        Raises FileNotFoundError.
        """
        self.stat(path)
        return {}

    def ping(self) -> bool:
        """Return True if the source answers a listing of its root now (not from the listing cache)."""
        try:
            self._list("/")
        except Exception as error:  # any failure means "not reachable" to a status display
            log.debug("ping failed: %s", error)
            return False
        return True

    def __enter__(self) -> AbstractTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
