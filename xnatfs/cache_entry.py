"""One entry of the cache: where it lives on disk, its single fill, and readers waiting for a member.

A *fill* function downloads the content into the staging folder and announces each member once
it is complete (:meth:`Filler.publish`); a reader waiting for one member gets it at once, while
the fill goes on for the others. Exactly one fill runs per entry: threads of one process wait on
a condition; other processes (other mounts on a shared filesystem) see the lock held and wait
for the member to appear in the staging folder or for the entry to be complete. A fill that
fails or a process killed mid-fill leaves only the staging folder, which the next filler removes:
nothing partial is ever mistaken for complete. The layout on disk is described in :mod:`xnatfs.cache`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xnatfs.exceptions import XnatfsError
from xnatfs.options import TIMEOUT
from xnatfs.stats import tree_size

if TYPE_CHECKING:
    from xnatfs.cache import Cache

log = logging.getLogger("xnatfs.cache")

LAYOUT = "v1"
POLL_SECONDS = 0.05
PROGRESS_INTERVAL = 1.0


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

    def get(self, member: str, fill: FillFunction, timeout: float = TIMEOUT) -> str:
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
        try:
            found = stat.S_ISREG(os.stat(final).st_mode)  # one system call for the usual answer
        except (FileNotFoundError, NotADirectoryError):
            found = False
        if found:
            self.cache.touch(self)
            return final
        if os.path.isdir(self.path):
            raise FileNotFoundError(errno.ENOENT, "not in the downloaded content", member)
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
            size = tree_size(self.staging)
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

    def wait_complete(self, timeout: float = TIMEOUT) -> None:
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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
