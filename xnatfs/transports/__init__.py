"""Transports: the sources a mount can show (XNAT, local folders, DICOM PACS, plug-ins).

``get_transport(url)`` picks a transport by URL scheme. Transports of other packages register
under the entry-point group ``xnatfs.transports`` (``name = module:Class``); their ``schemes``
attribute says which URL schemes they serve.
"""

from __future__ import annotations

import importlib
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


BUILT_IN = ("xnatfs.transports.file:FileTransport", "xnatfs.transports.xnat:XnatTransport",
            "xnatfs.transports.dicom:DicomTransport")  # fmt: skip


def transport_classes() -> dict[str, type[AbstractTransport]]:
    """Return every registered transport class by URL scheme (built-ins and entry points).

    A transport that fails to load is left out with a warning: it must not take the others down.
    """
    classes: dict[str, type[AbstractTransport]] = {}
    targets = [(target, None) for target in BUILT_IN]
    targets += [(ep.value, ep) for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.value not in BUILT_IN]
    for target, ep in targets:
        try:
            if ep is not None:
                cls = ep.load()
            else:
                module, _, name = target.partition(":")
                cls = getattr(importlib.import_module(module), name)
        except Exception as error:
            log.warning("transport %s could not be loaded: %s", target, error)
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
