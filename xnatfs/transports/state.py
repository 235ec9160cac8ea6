"""What the parts of a transport share: the listing cache (:mod:`xnatfs.transports.listings`), the
content side (:mod:`xnatfs.transports.content`) and the base class
(:class:`~xnatfs.transports.base.AbstractTransport`, which sets this state up) all read the
options, take the one lock, keep the stat cache current and tell listeners what changed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from cachetools import TTLCache

from xnatfs.transports.entry import Entry, normpath

log = logging.getLogger(__name__)


class TransportState:
    """The state every part of a transport uses (set by ``AbstractTransport.__init__``)."""

    name: ClassVar[str]
    netloc: str | None
    root: str | None
    opts: dict[str, Any]
    ttl: float  # seconds a listing is trusted
    timeout: float  # seconds a network wait may last
    offline: bool  # never contact the source
    _lock: threading.Lock  # guards the caches of every part; never held across a request
    _stats: TTLCache[str, Entry | None]  # stat() results by path (None: no such path)
    _change_listeners: list[Callable[[str], None]]

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
        for listener in list(self._change_listeners):
            try:
                listener(path)
            except Exception as error:  # a listener must not break the read that found the change
                log.warning("%s: change listener failed: %s", path, error)
