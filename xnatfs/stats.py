"""What a cache did since it was opened: counters and the downloads in flight, for ``xnatfs status``.

:class:`CacheStats` is attached to every :class:`~xnatfs.cache.Cache`. The cache counts hits and
wraps each fill it starts (:meth:`CacheStats.track`); the bytes of a fill in flight are measured
on demand from its staging folder, so the fill itself reports nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class _Active:
    """A fill running in this process."""

    label: str
    staging: str
    total: int | None
    started: float


class CacheStats:
    """Counters since the cache was opened, and the fills in flight. Thread-safe."""

    def __init__(self) -> None:
        self.downloads = 0  # fills started
        self.bytes = 0  # bytes of the fills that completed
        self.hits = 0  # lookups answered by complete content
        self.errors = 0  # fills that failed
        self._lock = threading.Lock()
        self._active: dict[int, _Active] = {}
        self._context = threading.local()

    def hit(self) -> None:
        """Count one lookup answered from complete content."""
        with self._lock:
            self.hits += 1

    @contextlib.contextmanager
    def context(self, label: str | None = None, total: int | None = None) -> Iterator[None]:
        """Name the fills this thread starts inside the block (``label``, e.g. a tree path, and
        ``total`` bytes when known): :meth:`in_flight` shows them so."""
        previous = getattr(self._context, "value", None)
        self._context.value = (label, total)
        try:
            yield
        finally:
            self._context.value = previous

    def track(self, entry: Any, fill: Callable[[Any], None]) -> Callable[[Any], None]:
        """Return ``fill`` wrapped to count it and to list it in flight while it runs.

        Called by the cache in the thread that starts the fill (whose :meth:`context` names it).
        """
        label, total = getattr(self._context, "value", None) or (None, None)
        active = _Active(label or "/".join(p for p in entry.key[2:] if p), entry.staging, total, time.time())

        def tracked(filler: Any) -> None:
            with self._lock:
                self.downloads += 1
                self._active[id(active)] = active
            try:
                fill(filler)
            except BaseException:
                with self._lock:
                    self.errors += 1
                raise
            else:
                size = tree_size(active.staging)
                with self._lock:
                    self.bytes += size
            finally:
                with self._lock:
                    self._active.pop(id(active), None)

        return tracked

    def in_flight(self) -> list[dict[str, Any]]:
        """Return the fills running now: ``{"path", "bytes", "total", "seconds"}`` each."""
        with self._lock:
            active = list(self._active.values())
        now = time.time()
        return [
            {"path": a.label, "bytes": tree_size(a.staging), "total": a.total, "seconds": round(now - a.started, 1)}
            for a in active
        ]

    def counters(self) -> dict[str, int]:
        """Return ``{"downloads", "bytes", "hits", "errors"}`` since the cache was opened."""
        with self._lock:
            return {"downloads": self.downloads, "bytes": self.bytes, "hits": self.hits, "errors": self.errors}


def tree_size(path: str) -> int:
    """Return the total size of the files below ``path`` (0 if it is gone)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
