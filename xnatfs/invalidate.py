"""Telling the kernel that what it keeps about a path is stale (libfuse 3's ``fuse_invalidate_path``).

The kernel keeps a file's attributes (its size above all) for ``--ttl`` seconds and its pages for as
long as it likes. When a transport learns that an entry changed (a size that turned out different
from the listing), the mount calls :meth:`KernelInvalidator.invalidate`: the kernel drops the
attributes and cached pages of that path, and asks again on the next stat or on the next read past
the size it knew.

The call runs in a worker thread of its own. From inside a FUSE callback it could deadlock: while a
read of a file waits for its answer, the kernel holds the page being read locked, and dropping the
pages of that file waits for that lock. The kernel drops the attributes first, before it waits for
pages, so :meth:`invalidate` returns when the call has finished or the worker waits in the kernel
for a page lock (uninterruptible sleep: the attributes are dropped by then), whichever comes first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time

log = logging.getLogger(__name__)

# Bound on the wait for the kernel to drop the attributes once the worker has entered the call (it
# is the first thing it does, before waiting for any page lock).
ATTRIBUTES_TIMEOUT = 1.0
# Bound on the wait for the worker to enter the call (it is idle unless many changes queue up).
ENTER_TIMEOUT = 2.0
STOP_TIMEOUT = 2.0


class KernelInvalidator:
    """Invalidates kernel attributes and pages by path, through libfuse 3's high-level API.

    :meth:`start` must be called from a FUSE callback (``init``): that is where libfuse tells
    which ``struct fuse`` is ours. Until then, and on libfuse 2, :meth:`invalidate` does nothing.
    """

    def __init__(self) -> None:
        self._fuse: int | None = None
        self._function: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
        self._queue: queue.SimpleQueue[tuple[bytes, threading.Event, threading.Event] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # held while the worker is inside libfuse; stop() waits for it
        self._thread: threading.Thread | None = None
        self._worker_tid = 0  # the worker's kernel thread id, to see when it waits in the kernel
        self.count = 0  # invalidations handed to the kernel (for tests and logs)

    def start(self) -> bool:
        """Find our ``struct fuse`` and start the worker; return False when invalidation is not available."""
        from xnatfs.fuse import mfusepy

        libfuse = mfusepy._libfuse
        function = getattr(libfuse, "fuse_invalidate_path", None)  # libfuse >= 3.1
        if function is None:
            log.warning("this libfuse cannot invalidate kernel caches: changed sizes show after --ttl")
            return False
        function.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        function.restype = ctypes.c_int
        fuse = libfuse.fuse_get_context().contents.fuse
        if not fuse:
            return False
        self._fuse, self._function = fuse, function
        self._thread = threading.Thread(target=self._work, name="xnatfs-invalidate", daemon=True)
        self._thread.start()
        return True

    def invalidate(self, path: str) -> bool:
        """Make the kernel drop what it keeps about ``path``; return True once it has been told.

        Returns once the kernel has dropped the attributes (the pages may follow later, when a
        read in progress on that file has been answered), at most ``ATTRIBUTES_TIMEOUT`` after the
        worker took the request. Returns False when invalidation is not available, or the worker
        did not get to it within ``ENTER_TIMEOUT``.
        """
        if self._fuse is None:
            return False
        entered, done = threading.Event(), threading.Event()
        self._queue.put((os.fsencode(path), entered, done))
        if not entered.wait(ENTER_TIMEOUT):
            log.warning("%s: kernel invalidation is late; the change may show only after --ttl", path)
            return False
        deadline = time.monotonic() + ATTRIBUTES_TIMEOUT
        while not done.wait(0.001) and time.monotonic() < deadline:
            if self._worker_state() == "D":  # waiting in the kernel for a page lock: past the attributes
                break
        return True

    def _worker_state(self) -> str:
        """Return the scheduler state of the worker thread (``R``, ``S``, ``D``, ...), "" if unknown."""
        try:
            with open(f"/proc/self/task/{self._worker_tid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0].decode()
        except (OSError, IndexError):
            return ""

    def stop(self) -> None:
        """Stop the worker; after this, :meth:`invalidate` does nothing (the ``struct fuse`` goes away)."""
        if self._thread is None:
            return
        self._queue.put(None)
        if self._lock.acquire(timeout=STOP_TIMEOUT):
            self._fuse = None
            self._lock.release()
        else:
            self._fuse = None

    def _work(self) -> None:
        self._worker_tid = threading.get_native_id()
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, entered, done = item
            with self._lock:
                entered.set()
                if self._fuse is not None and self._function is not None:
                    result = self._function(self._fuse, path)
                    # -ENOENT: the kernel never looked the path up, so it keeps nothing about it.
                    log.debug("invalidated %s in the kernel: %d", os.fsdecode(path), result)
                    self.count += 1
            done.set()
