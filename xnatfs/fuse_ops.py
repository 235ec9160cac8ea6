"""The FUSE operations: a thin, read-only view of a transport.

Every operation asks the transport (listings, attributes, content) and turns whatever goes
wrong into one errno, logged once, in :func:`_errors`. No HTTP or ZIP details live here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from xnatfs import readbuf, xattrs
from xnatfs.exceptions import XnatfsError
from xnatfs.fuse import mfusepy
from xnatfs.invalidate import KernelInvalidator
from xnatfs.options import TTL
from xnatfs.transports.base import AbstractTransport, Entry

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
MAX_OPEN_FILES = 512
MAX_TOLD_SIZES = 100_000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def errno_of(error: BaseException) -> int:
    """Return the errno a FUSE operation answers for ``error``."""
    if isinstance(error, XnatfsError):
        return error.errno
    if isinstance(error, OSError) and error.errno:
        return error.errno
    if isinstance(error, FileNotFoundError):
        return errno.ENOENT
    if isinstance(error, PermissionError):
        return errno.EACCES
    if isinstance(error, TimeoutError):
        return errno.ETIMEDOUT
    return errno.EIO


def _errors(method: F) -> F:
    """Turn exceptions of a FUSE operation into FuseOSError with the right errno, logged once."""

    @functools.wraps(method)
    def wrapper(self: Operations, path: str, *args: Any) -> Any:
        try:
            return method(self, path, *args)
        except mfusepy.FuseOSError:
            raise
        except Exception as error:
            code = errno_of(error)
            if code == errno.ENOENT:
                log.debug("%s %s: %s", method.__name__, path, error)
            else:
                log.error("%s %s: %s", method.__name__, path, error or type(error).__name__)
            raise mfusepy.FuseOSError(code) from None

    return wrapper  # type: ignore[return-value]


class ToldSizes:
    """The size last told to the kernel per file path, for the most recently told ``limit`` paths.

    Least recently told first out: a file being read was told its size lately (by a listing or a
    lookup), so a walk over many folders never forgets it (a reset of the whole table did).
    """

    def __init__(self, limit: int) -> None:
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def tell(self, sizes: list[tuple[str, int]]) -> None:
        """Record ``(path, size)`` pairs as told now."""
        with self._lock:
            for path, size in sizes:
                self._sizes[path] = size
                self._sizes.move_to_end(path)
            while len(self._sizes) > self._limit:
                self._sizes.popitem(last=False)

    def get(self, path: str) -> int | None:
        """Return the size last told for ``path``, or None."""
        with self._lock:
            return self._sizes.get(path)


class Operations(mfusepy.Operations):
    """Read-only FUSE operations over a transport.

    ``ttl`` is how long the kernel may keep attributes, names and negative lookups (seconds).

    The kernel is never told a file size that is not true: a read returns exactly ``st_size``
    bytes, and the kernel may keep attributes and pages between opens (no direct_io, so mmap
    works). A file whose size the transport does not know yet (a PACS series not retrieved) is
    fetched when it is first looked up. When a transport later learns that an entry changed, it
    calls ``changed(path)`` and the kernel drops what it keeps about that path.
    """

    use_ns = True

    def __init__(self, transport: AbstractTransport, ttl: float = TTL) -> None:
        self.transport = transport
        self.ttl = ttl
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mounted_at = time.time()
        self.on_ready: Callable[[], None] | None = None
        self.destroyed = False  # set when libfuse tears the file system down (unmount or signal)
        # The size last told to the kernel, per file path: how a change is to be told (see _on_change).
        self._told = ToldSizes(MAX_TOLD_SIZES)
        self._reading = threading.local()  # the path this thread is answering a read for
        self.invalidator = KernelInvalidator()
        transport.add_change_listener(self._on_change)
        self._files: OrderedDict[tuple[str, str], tuple[io.FileIO, float]] = OrderedDict()
        self._files_lock = threading.Lock()
        self._files_ttl = min(ttl, 30.0)
        self._dir_handles = itertools.count(1)
        # Identifies this source in inode numbers, so two sources never share one.
        self._ino_salt = str(transport.opts.get("url", transport.name)).encode()

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None and conn.capable & readbuf.FUSE_CAP_SPLICE_WRITE:
            # Reads are answered with a descriptor (read_buf): libfuse then splices the cache file's
            # pages to the kernel instead of copying them through a buffer.
            conn.want |= readbuf.FUSE_CAP_SPLICE_WRITE
        if config is not None:
            config.use_ino = 1
            config.entry_timeout = self.ttl
            config.attr_timeout = self.ttl
            config.negative_timeout = self.ttl
            self.invalidator.start()  # libfuse 3 only: init is where our struct fuse is known
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        self.destroyed = True
        self.invalidator.stop()

    def _attrs(self, entry: Entry) -> dict[str, Any]:
        mtime_ns = int((entry.mtime or self.mounted_at) * 1e9)
        size = entry.size or 0
        return {
            "st_mode": entry.mode,
            "st_ino": self._ino(entry),
            "st_nlink": 2 if entry.is_dir else 1,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_size": 4096 if entry.is_dir else size,
            "st_blocks": 0 if entry.is_dir else (size + 511) // 512,
            "st_blksize": 1 << 17,
            "st_mtime": mtime_ns,
            "st_ctime": mtime_ns,
            "st_atime": mtime_ns,
        }

    def _ino(self, entry: Entry) -> int:
        if entry.key == "/":
            return 1
        digest = hashlib.blake2b(entry.key.encode("utf-8", "surrogateescape"), digest_size=8, key=self._ino_salt[:64])
        return (int.from_bytes(digest.digest(), "little") >> 1) | 2  # never 0 or 1 (the root)

    @_errors
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        entry = self.transport.stat(path)
        if not entry.is_dir:
            if entry.size is None:
                entry = self._sized(path)
            self._told.tell([(path, entry.size or 0)])
        return self._attrs(entry)

    def _sized(self, path: str) -> Entry:
        """Return the entry of file ``path`` with its true size, fetching its content to learn it.

        The kernel keeps the size it is told for ``ttl`` seconds and never reads past it, so a
        size it is told must be the size reads will return (a PACS lists instances without sizes).
        """
        local = self.transport.fetch(path)
        entry = self.transport.stat(path)
        if entry.size is None:
            entry = replace(entry, size=os.path.getsize(local))
        return entry

    def _on_change(self, path: str) -> None:
        """Make the kernel forget the attributes and pages of ``path`` (the transport says it changed)."""
        with self._files_lock:
            for key in [key for key in self._files if key[0] == path]:
                del self._files[key]
        if getattr(self._reading, "path", None) == path:
            # Found while answering a read of this very file. If the file shrank, the short answer
            # makes the kernel shrink it too; invalidating first would make it pad with zeros.
            told = self._told.get(path)
            try:
                size = self.transport.stat(path).size
            except Exception:
                size = None
            if told is not None and size is not None and size < told:
                return
        self.invalidator.invalidate(path)

    def opendir(self, path: str) -> int:
        # A number per directory handle: a listing answered in parts is kept under it (xnatfs.readdirplus).
        return next(self._dir_handles)

    @_errors
    def readdir(self, path: str, fh: Any) -> list[tuple[str, dict[str, int], int]]:
        """Return the entries of folder ``path``, each with all its attributes when its size is known
        (a READDIRPLUS answer carries them: see :mod:`xnatfs.readdirplus`), else its mode and inode."""
        # With use_ino, every entry needs its inode number: readdir(3) skips entries with inode 0.
        here = {"st_mode": stat.S_IFDIR | 0o555, "st_ino": self._ino(self.transport.stat(path))}
        entries = [(".", here, 0), ("..", {"st_mode": stat.S_IFDIR | 0o555, "st_ino": 1}, 0)]
        prefix = path.rstrip("/") + "/"
        told = []
        for entry in self.transport.listdir(path):
            if entry.is_dir or entry.size is not None:
                if not entry.is_dir:
                    told.append((prefix + entry.name, entry.size or 0))  # as getattr: the kernel is told
                entries.append((entry.name, self._attrs(entry), 0))
            else:
                entries.append((entry.name, {"st_mode": entry.mode, "st_ino": self._ino(entry)}, 0))
        self._told.tell(told)
        return entries

    @_errors
    def open(self, path: str, fi: Any) -> int:
        if fi.flags & WRITE_FLAGS:
            raise mfusepy.FuseOSError(errno.EROFS)
        # Sizes told to the kernel are always true (see getattr), so it is asked not to send opens at
        # all (one costs a round trip through libfuse and Python per file): it then sends no more opens
        # and releases, keeps page caches between opens, and reads come with the path alone (see
        # read_buf). Content is fetched on the first read.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    @_errors
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        file = self._reading_file(path)  # this reference keeps the fd open while we read
        return os.pread(file.fileno(), size, offset)

    @_errors
    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fi: Any) -> int:
        # libfuse reads from the descriptor after this returns (see xnatfs.readbuf): this thread keeps
        # the file referenced until its next read, so it is not closed (and its number reused) meanwhile.
        self._reading.file = file = self._reading_file(path)
        readbuf.answer_from_fd(bufpp, file.fileno(), size, offset)
        return 0

    def _reading_file(self, path: str) -> io.FileIO:
        """Return the open file of ``path`` for a read; a change found meanwhile knows it is this read's."""
        self._reading.path = path
        try:
            return self._open_file(path)
        finally:
            self._reading.path = None

    def _open_file(self, path: str) -> io.FileIO:
        """Return an open file with the content of ``path`` (kept for reads; fetched if needed)."""
        now = time.monotonic()
        entry = self.transport.stat(path)
        key = (path, entry.key or path)  # a new key when the content changed on the server
        with self._files_lock:
            found = self._files.get(key)
            if found is not None and now - found[1] < self._files_ttl:
                self._files.move_to_end(key)
                return found[0]
        file = io.FileIO(self.transport.open_fd(path, entry), "r", closefd=True)  # looked up once
        with self._files_lock:
            self._files[key] = (file, now)
            while len(self._files) > MAX_OPEN_FILES:
                # Dropped, not closed: a read still holding it finishes first (refcounting closes it).
                self._files.popitem(last=False)
        return file

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 1 << 17, "f_frsize": 1 << 17, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    @_errors
    def listxattr(self, path: str) -> list[str]:
        if not self.transport.opts.get("xattrs", True):
            raise mfusepy.FuseOSError(errno.ENOSYS)  # the kernel then stops asking
        return list(xattrs.attributes(self.transport, path))

    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not self.transport.opts.get("xattrs", True):
            raise mfusepy.FuseOSError(errno.ENOSYS)
        found = xattrs.value(self.transport, path, name)
        if found is None:
            raise mfusepy.FuseOSError(errno.ENODATA)
        return found

    # Everything that would change the tree: a read-only file system.
    def _read_only(self, *args: Any) -> int:
        raise mfusepy.FuseOSError(errno.EROFS)

    create = mkdir = rmdir = unlink = rename = symlink = link = _read_only
    chmod = chown = truncate = write = utimens = setxattr = removexattr = _read_only
