"""Transports: the sources a mount can show (XNAT, local folders, DICOM PACS, plug-ins).

``get_transport(url)`` picks a transport by URL scheme. Transports of other packages register
under the entry-point group ``xnatfs.transports`` (``name = module:Class``); their ``schemes``
attribute says which URL schemes they serve.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlsplit

from xnatfs.transports.base import (
    AbstractTransport,
    AssociationFailed,
    AssociationNotEstablished,
    Entry,
    NoOtherInstance,
    RootIsNotDirectory,
)

__all__ = [
    "AbstractTransport",
    "AssociationFailed",
    "AssociationNotEstablished",
    "Entry",
    "NoOtherInstance",
    "RootIsNotDirectory",
    "UnknownSchemeError",
    "get_transport",
    "transport_classes",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "xnatfs.transports"


class UnknownSchemeError(ValueError):
    """No transport serves a URL's scheme."""


def transport_classes() -> dict[str, type[AbstractTransport]]:
    """Return every registered transport class by URL scheme (built-ins and entry points)."""
    from xnatfs.transports.dicom import DicomTransport
    from xnatfs.transports.file import FileTransport
    from xnatfs.transports.xnat import XnatTransport

    classes: dict[str, type[AbstractTransport]] = {}
    for cls in (FileTransport, XnatTransport, DicomTransport):
        for scheme in cls.schemes:
            classes[scheme] = cls
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as error:  # a broken plug-in must not break the others
            log.warning("transport plug-in %s could not be loaded: %s", ep.value, error)
            continue
        for scheme in getattr(cls, "schemes", []):
            classes.setdefault(scheme, cls)
    return classes


def get_transport(url: str, mode: str = "r", opts: dict[str, Any] | None = None) -> AbstractTransport:
    """Return a transport for ``url``, chosen by its scheme.

    ``file:///abs/path``, ``http(s)://host[:port][/context]``, ``xnat://host[:port]``,
    ``dicom://AET@host:port`` and the schemes of installed plug-ins.
    Raises UnknownSchemeError naming the known schemes.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    classes = transport_classes()
    cls = classes.get(scheme)
    if cls is None:
        known = ", ".join(f"{s}://" for s in sorted(classes))
        raise UnknownSchemeError(f"no transport for {url!r}: unknown scheme {scheme or '(none)'!r}; known: {known}")
    opts = dict(opts or {})
    opts.setdefault("url", url)
    return cls(netloc=parts.netloc, root=unquote(parts.path) or "/", mode=mode, opts=opts)
