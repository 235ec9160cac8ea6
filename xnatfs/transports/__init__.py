"""Transports: the sources a mount can show (XNAT, local folders, DICOM PACS, plug-ins).

``get_transport(url)`` picks a transport by URL scheme. Transports of other packages register
under the entry-point group ``xnatfs.transports`` (``name = module:Class``); their ``schemes``
attribute says which URL schemes they serve.

The built-in classes (``FileTransport``, ``XnatTransport``, ``DicomTransport``) and the names of
:mod:`xnatfs.transports.base` are exported here but imported on first use, so that importing this
package stays cheap: pynetdicom is loaded only when DICOM is used, the transport machinery (cache,
listings) only by what uses a transport, and the installed packages' metadata only when a scheme
is not built in (``xnatfs download`` starts without any of them).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from xnatfs.transports.base import AbstractTransport

__all__ = [
    "AbstractTransport",
    "AssociationFailed",
    "AssociationNotEstablished",
    "DicomTransport",
    "Entry",
    "FileTransport",
    "NoOtherInstance",
    "RootIsNotDirectory",
    "UnknownSchemeError",
    "get_transport",
    "transport_class",
    "transport_classes",
    "Unit",
    "XnatTransport",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "xnatfs.transports"


class UnknownSchemeError(ValueError):
    """No transport serves a URL's scheme."""


# Built-in transports by URL scheme, as "module:Class" (imported only when their scheme is used).
BUILT_IN_SCHEMES = {
    "file": "xnatfs.transports.file:FileTransport",
    "http": "xnatfs.transports.xnat:XnatTransport",
    "https": "xnatfs.transports.xnat:XnatTransport",
    "xnat": "xnatfs.transports.xnat:XnatTransport",
    "dicom": "xnatfs.transports.dicom:DicomTransport",
}
BUILT_IN = tuple(dict.fromkeys(BUILT_IN_SCHEMES.values()))
_LAZY = {target.rpartition(":")[2]: target for target in BUILT_IN}
_BASE_NAMES = ("AbstractTransport", "AssociationFailed", "AssociationNotEstablished", "Entry", "NoOtherInstance",
               "RootIsNotDirectory", "Unit")  # fmt: skip
_LAZY.update({name: f"xnatfs.transports.base:{name}" for name in _BASE_NAMES})


def __getattr__(name: str) -> Any:
    """Import an exported name on first use (``from xnatfs.transports import FileTransport``)."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    globals()[name] = cls
    return cls


def _load(target: str) -> type[AbstractTransport]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def transport_classes() -> dict[str, type[AbstractTransport]]:
    """Return every registered transport class by URL scheme (built-ins and entry points).

    A transport that fails to load is left out with a warning: it must not take the others down.
    """
    from importlib.metadata import entry_points  # here: reading every package's metadata takes a while

    classes: dict[str, type[AbstractTransport]] = {}
    targets = [(target, None) for target in BUILT_IN]
    targets += [(ep.value, ep) for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.value not in BUILT_IN]
    for target, ep in targets:
        try:
            cls = ep.load() if ep is not None else _load(target)
        except Exception as error:
            log.warning("transport %s could not be loaded: %s", target, error)
            continue
        for scheme in getattr(cls, "schemes", []):
            classes.setdefault(scheme, cls)
    return classes


def transport_class(url: str) -> type[AbstractTransport]:
    """Return the transport class that serves ``url``'s scheme (only its module is imported).

    Raises UnknownSchemeError naming the known schemes.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in BUILT_IN_SCHEMES:
        return _load(BUILT_IN_SCHEMES[scheme])
    classes = transport_classes()
    cls = classes.get(scheme)
    if cls is None:
        known = ", ".join(f"{s}://" for s in sorted(set(classes) | set(BUILT_IN_SCHEMES)))
        raise UnknownSchemeError(f"no transport for {url!r}: unknown scheme {scheme or '(none)'!r}; known: {known}")
    return cls


def get_transport(url: str, mode: str = "r", opts: dict[str, Any] | None = None) -> AbstractTransport:
    """Return a transport for ``url``, chosen by its scheme.

    ``file:///abs/path``, ``http(s)://host[:port][/context]``, ``xnat://host[:port]``,
    ``dicom://AET@host:port`` and the schemes of installed plug-ins.
    Raises UnknownSchemeError naming the known schemes.
    """
    cls = transport_class(url)
    parts = urlsplit(url)
    opts = dict(opts or {})
    opts.setdefault("url", url)
    return cls(netloc=parts.netloc, root=unquote(parts.path) or "/", mode=mode, opts=opts)
