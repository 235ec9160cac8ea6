"""The persistent catalog: every folder listing kept on disk, so remounts and offline mounts need no server.

Layout, below the cache directory::

    catalog-v1/{scope hash}/scope.json        what the scope is: transport, source, user
    catalog-v1/{scope hash}/{kk}/{key hash}.json   one listing: its key, when it was fetched, its entries

A scope is one source seen by one user (``xnat|https://host|alice``): users never read each
other's listings. Hashes are SHA-256 (hex, shortened). Each listing file is written whole to a
temporary file in the same folder and published with ``rename``, which is atomic on local file
systems and on NFS, Lustre and GPFS: readers see the old file or the new one, never a mix, and no
lock is needed, so several mounts on several machines can share one cache directory. A database
such as SQLite would need POSIX byte-range locks, which NFS implements badly or not at all
(corruption, or "database is locked" forever). A file that cannot be read or parsed, or that
belongs to another key, is ignored (the listing is fetched again and the file replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

LAYOUT = "catalog-v1"
FORMAT = "xnatfs-catalog-1"


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


class Catalog:
    """The listings of one scope (source and user) in the folder ``root`` (a cache directory)."""

    def __init__(self, root: str, scope: str) -> None:
        self.scope = scope
        self.directory = os.path.join(os.path.abspath(root), LAYOUT, _digest(scope, 32))
        self._scope_written = False
        self._lock = threading.Lock()

    def path_of(self, key: str) -> str:
        """Return the file that holds the listing of ``key``."""
        name = _digest(key, 40)
        return os.path.join(self.directory, name[:2], name + ".json")

    def load(self, key: str) -> tuple[float, list[Any]] | None:
        """Return ``(fetched, entries)`` stored for ``key``, or None when there is none usable.

        ``fetched`` is the time (seconds since the epoch) the listing came from the source.
        A missing, unreadable, truncated or foreign file gives None (and is logged at debug level).
        """
        path = self.path_of(key)
        try:
            with open(path, "rb") as f:
                document = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.info("catalog: ignoring %s (%s); the listing will be fetched again", path, error)
            return None
        try:
            if (
                document["format"] != FORMAT
                or document["scope"] != self.scope
                or document["key"] != key
                or not isinstance(document["entries"], list)
            ):
                raise ValueError("not this listing")
            return float(document["fetched"]), document["entries"]
        except (KeyError, TypeError, ValueError) as error:
            log.info("catalog: ignoring %s (%s); the listing will be fetched again", path, error)
            return None

    def store(self, key: str, fetched: float, entries: list[Any]) -> None:
        """Write the listing of ``key`` (JSON-able ``entries``), published atomically by rename.

        Raises TypeError when ``entries`` are not JSON-able; a write that fails (disk full,
        read-only cache) is logged and otherwise ignored: the catalog is an optimisation.
        """
        data = json.dumps(
            {"format": FORMAT, "scope": self.scope, "key": key, "fetched": fetched, "entries": entries},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8", "surrogateescape")
        path = self.path_of(key)
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._write_scope()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as error:
            log.warning("catalog: cannot write %s: %s", path, error)
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def forget(self, key: str) -> None:
        """Remove the stored listing of ``key`` (if any)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path_of(key))

    def _write_scope(self) -> None:
        """Write ``scope.json`` once: it says whose listings a folder holds (for people, not for lookups)."""
        if self._scope_written:
            return
        with self._lock:
            if self._scope_written:
                return
            os.makedirs(self.directory, exist_ok=True)
            target = os.path.join(self.directory, "scope.json")
            if not os.path.exists(target):
                temporary = f"{target}.{os.getpid()}.tmp"
                with open(temporary, "w") as f:
                    json.dump({"format": FORMAT, "scope": self.scope}, f)
                os.replace(temporary, target)
            self._scope_written = True
