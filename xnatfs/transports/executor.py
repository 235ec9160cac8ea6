"""Background work of a transport on a bounded number of threads: listing read-ahead (``listing_jobs``)
and download-ahead (``parallel_downloads``) each run on one :class:`BoundedExecutor`."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

# A worker with nothing to do waits this long for more before its thread ends.
IDLE_SECONDS = 5.0


class BoundedExecutor:
    """Runs submitted calls in the order submitted, on at most ``workers`` threads.

    Threads start as work comes and end once idle for :data:`IDLE_SECONDS`. They are daemon
    threads: background work never holds up an exit. A call is queued under a key, and a key
    already queued or running is not queued again. A call's exception is logged and dropped:
    background work is an optimisation, whoever needs its result asks for it and gets the error.
    """

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self.name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Hashable, Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._keys: set[Hashable] = set()  # queued or running
        self._running = 0  # threads started and not ended
        self._closed = False
        self._local = threading.local()

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)``; return False (and queue nothing) when ``key`` is queued or running
        already, or the executor is shut down or has no workers."""
        with self._lock:
            if self._closed or self.workers <= 0 or key in self._keys:
                return False
            self._keys.add(key)
            self._queue.put((key, fn, args))
            start = self._running < self.workers
            if start:
                self._running += 1
        if start:
            threading.Thread(target=self._work, name=self.name, daemon=True).start()
        return True

    def in_worker(self) -> bool:
        """Return True when called from one of this executor's threads (e.g. by the work it runs)."""
        return getattr(self._local, "worker", False)

    def shutdown(self) -> None:
        """Drop the calls not started yet and accept no more; running ones finish in the background."""
        with self._lock:
            self._closed = True

    def _work(self) -> None:
        self._local.worker = True
        while True:
            try:
                key, fn, args = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # (a call queued meanwhile counted on this thread)
                        self._running -= 1
                        return
                continue
            try:
                if not self._closed:
                    fn(*args)
            except Exception as error:  # noqa: BLE001 - see the class's docstring
                log.debug("%s: %r failed: %s", self.name, key, error)
            finally:
                with self._lock:
                    self._keys.discard(key)
