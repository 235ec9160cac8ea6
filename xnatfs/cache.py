"""The persistent cache: downloaded content, shared by threads, mounts and processes.

The cache holds *entries*. An entry is one unit of download -- an XNAT scan resource, a PACS
series -- identified by a key (server, project, experiment, scan, resource) and a version taken
from the server (digests, sizes, dates), so that changed data gets a new entry. On disk::

    {cache_dir}/v1/{key hash}/{version hash}/           complete content (published by rename)
    {cache_dir}/v1/{key hash}/{version hash}.staging/   content being filled
    {cache_dir}/v1/{key hash}/{version hash}.lock       flock: held by whoever fills the entry
    {cache_dir}/v1/{key hash}/{version hash}.json       key, version, size, last use

A *fill* function downloads the content into the staging folder and announces each member once
it is complete (:meth:`Filler.publish`); a reader waiting for one member gets it at once, while
the fill goes on for the others. Exactly one fill runs per entry: threads of one process wait on
a condition; other processes (other mounts on a shared filesystem) see the lock held and wait
for the member to appear in the staging folder or for the entry to be published. A fill that
fails or a process killed mid-fill leaves only the staging folder, which the next filler removes:
nothing partial is ever mistaken for complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xnatfs import privacy
from xnatfs.exceptions import XnatfsError
from xnatfs.stats import CacheStats

log = logging.getLogger(__name__)

LAYOUT = "v1"
POLL_SECONDS = 0.05
# An entry used this recently is never evicted: a reader may be about to open it.
EVICTION_GRACE_SECONDS = 60.0
PROGRESS_INTERVAL = 1.0
TOUCH_INTERVAL = 30.0  # well below EVICTION_GRACE_SECONDS, so an entry in use is never evicted


def default_cache_dir() -> str:
    """Return ``$XDG_CACHE_HOME/xnatfs``, else ``~/.cache/xnatfs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xnatfs")


class Filler:
    """Handed to a fill function: where to write, and how to announce progress."""

    def __init__(self, entry: CacheEntry, staging: str) -> None:
        self.entry = entry
        self.staging = staging
        self._last_progress = 0.0

    def publish(self, member: str) -> None:
        """Announce that ``member`` (a relative path, already complete in ``staging``) is ready."""
        self.entry._wake_waiters()  # each waiter looks its own member up
        self.progress()

    def write(self, member: str, data: bytes | Iterable[bytes]) -> None:
        """Write ``member`` (a relative path) into ``staging`` whole and publish it: the bytes go to
        a temporary name that is renamed once complete, so no reader ever sees a partial file.
        ``data`` is the content or an iterable of its chunks. Raises OSError (and whatever the
        iterable raises); nothing of the member is left then."""
        target = os.path.join(self.staging, member)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = f"{target}.xnatfs-partial"
        try:
            with open(partial, "wb") as out:
                for chunk in (data,) if isinstance(data, bytes) else data:
                    out.write(chunk)
                    self.progress()
            os.rename(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        self.publish(member)

    def progress(self) -> None:
        """Say the fill is alive (other processes time out a fill that shows no progress)."""
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            with contextlib.suppress(OSError):
                os.utime(self.staging)


FillFunction = Callable[[Filler], None]


class IncompleteEntry(XnatfsError):
    """A cache entry's fill ended without publishing it."""


@dataclass(frozen=True)
class EntryInfo:
    """A complete cache entry as found on disk: where (``base``), what, how big, last use (epoch)."""

    base: str
    key: tuple[str, ...]
    version: str
    size: int
    last_used: float


@dataclass
class _Fill:
    """State of a fill running in this process."""

    done: bool = False
    error: BaseException | None = None


class CacheEntry:
    """One unit of download in the cache. Get it from :meth:`Cache.entry`."""

    def __init__(self, cache: Cache, key: tuple[str, ...], version: str) -> None:
        self.cache = cache
        self.key = key
        self.version = version
        key_hash = _digest("\0".join(key))
        self.folder = os.path.join(cache.directory, LAYOUT, key_hash)
        base = os.path.join(self.folder, _digest(version))
        self.path = base
        self.staging = base + ".staging"
        self.lock_path = base + ".lock"
        self.meta_path = base + ".json"
        self._cond = threading.Condition()
        self._fill: _Fill | None = None

    def is_complete(self) -> bool:
        """Return True if the entry has been published."""
        return os.path.isdir(self.path)

    def get(self, member: str, fill: FillFunction, timeout: float = 30.0) -> str:
        """Return the local path of ``member``, filling the entry first if needed.

        ``member`` is a relative path inside the entry. Blocks until that member is complete,
        however the work is shared. ``timeout`` bounds a wait during which the fill shows no
        progress. Raises FileNotFoundError if the complete entry has no such member, or the
        fill's exception if it failed.
        """
        member = member.strip("/")
        while True:
            found = self._lookup(member)
            if found:
                return found
            with self._cond:
                ours = self._fill is not None or self._start_fill(fill)
            if ours:
                return self._wait_this_process(member)
            staged = self._wait_other_process(member, timeout)
            if staged:
                return staged

    def _lookup(self, member: str) -> str | None:
        """Return the path of ``member`` if the entry is complete (raise if it lacks it)."""
        final = os.path.join(self.path, member)
        if os.path.isdir(self.path):
            if not os.path.isfile(final):
                raise FileNotFoundError(errno.ENOENT, "not in the downloaded content", member)
            self.cache.touch(self)
            return final
        return None

    def _start_fill(self, fill: FillFunction) -> bool:
        """Take the entry's lock and start ``fill`` in a thread; False if another process holds it."""
        os.makedirs(self.folder, mode=self.cache.dir_mode, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.cache.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if os.path.isdir(self.path):  # published while we were getting the lock
            os.close(fd)
            return True
        self._fill = _Fill()
        fill = self.cache.stats.track(self, fill)  # counted, and listed in flight by `xnatfs status`
        thread = threading.Thread(
            target=self._run_fill, args=(fill, fd), name=f"fill-{os.path.basename(self.path)}", daemon=True
        )
        thread.start()
        return True

    def _run_fill(self, fill: FillFunction, lock_fd: int) -> None:
        state = self._fill
        assert state is not None
        try:
            # A staging folder left by a failed or killed fill is never trusted.
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging, mode=self.cache.dir_mode)
            fill(Filler(self, self.staging))
            size = _tree_size(self.staging)
            os.rename(self.staging, self.path)
            self.cache._write_meta(self, size)
            log.info("cached %s (%d bytes)", "/".join(self.key), size)
        except BaseException as error:  # noqa: BLE001 - handed to every waiter
            state.error = error
            shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            with self._cond:
                state.done = True
                self._fill = None
                self._cond.notify_all()
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
        if state.error is None:
            self.cache.after_fill(self)

    def _wake_waiters(self) -> None:
        """Wake the readers of this process waiting for members (a member was published)."""
        with self._cond:
            self._cond.notify_all()

    def _wait_this_process(self, member: str) -> str:
        staged = os.path.join(self.staging, member)
        with self._cond:
            state = self._fill
            while True:
                if os.path.isfile(staged):
                    return staged
                found = self._lookup(member)
                if found:
                    return found
                if state is None or state.done:
                    break
                self._cond.wait(timeout=1.0)
        if state is not None and state.error is not None:
            raise state.error
        found = self._lookup(member)
        if found:
            return found
        raise FileNotFoundError(errno.ENOENT, "not in the downloaded content", member)

    def _wait_other_process(self, member: str, timeout: float) -> str | None:
        """Wait while another process fills the entry.

        Returns the member's staged path once it is complete there, or None when the entry was
        published or the other fill ended (the caller looks again). Raises TimeoutError when the
        other fill shows no progress for ``timeout`` seconds.
        """
        staged = os.path.join(self.staging, member)
        last_change = time.monotonic()
        last_mtime = None
        while True:
            if os.path.isdir(self.path):
                return None
            if os.path.isfile(staged):
                return staged
            if not _locked_elsewhere(self.lock_path):
                return None
            with contextlib.suppress(OSError):
                mtime = os.stat(self.staging).st_mtime_ns
                if mtime != last_mtime:
                    last_mtime, last_change = mtime, time.monotonic()
            if time.monotonic() - last_change > timeout:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"another process has been filling the cache entry without progress for {timeout:.0f} s",
                )
            time.sleep(POLL_SECONDS)

    def staged_path(self, member: str) -> str | None:
        """Return the path of ``member`` if it is complete, published or staged; else None."""
        for base in (self.path, self.staging):
            candidate = os.path.join(base, member.strip("/"))
            if os.path.isfile(candidate):
                return candidate
        return None

    def wait_published(self, timeout: float = 30.0) -> None:
        """Block until the whole entry is published (a reader may have its member long before).

        Raises the fill's exception if the fill running in this process failed, TimeoutError if a
        fill in another process shows no progress for ``timeout`` seconds, and
        :class:`IncompleteEntry` if no fill is running and the entry is not published.
        """
        while not self.is_complete():
            with self._cond:
                state = self._fill
                while state is not None and not state.done:
                    self._cond.wait(timeout=1.0)
            if state is not None:
                if state.error is not None:
                    raise state.error
                continue
            if _locked_elsewhere(self.lock_path):
                self._wait_other_process("", timeout)  # "" is never a staged file: waits for the end
                continue
            if not self.is_complete():
                raise IncompleteEntry(f"the download of {'/'.join(self.key[2:])} ended before it was complete")


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


def _locked_elsewhere(lock_path: str) -> bool:
    """Return True if some process holds the flock on ``lock_path``."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
