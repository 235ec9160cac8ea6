"""What a transport's tree is made of: entries, units of content, tree paths, probe names."""

from __future__ import annotations

import posixpath
import stat as stat_module
from dataclasses import dataclass, field
from typing import Any

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


def normpath(path: str) -> str:
    """Return ``path`` as an absolute tree path without ``.``/``..``/duplicate separators."""
    path = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if path in ("/", "//") else path
