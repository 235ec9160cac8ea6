"""The XNAT transport: an XNAT archive as a tree of folders, scan resources fetched as ZIPs.

Tree (the layout XNAT uses inside its own downloads, below the experiment folder)::

    /{project ID}/{subject label}/{experiment label}/scans/{scan ID}-{type}/resources/{label}/files/{path}
    /{project ID}/{subject label}/{experiment label}/resources/{label}/files/{path}

Every folder comes from one JSON listing; a resource's ``files`` folder and all its sub-folders
come from one files listing. The first read of a file downloads its whole resource as one ZIP and
extracts it, as it arrives, into the cache; the reader gets its file as soon as it is complete.

Modules: :mod:`.transport` (the tree: listings, bulk listings, metadata), :mod:`.content`
(downloads and uploads), :mod:`.refs` (typed references to XNAT objects, files listings),
:mod:`.names` (XNAT's naming rules).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xnatfs.transports.xnat.names import file_url_path, parse_date, resource_names, server_url, zip_names

if TYPE_CHECKING:
    from xnatfs.transports.xnat.refs import FileListing, RemoteFile, Resource, file_listing
    from xnatfs.transports.xnat.transport import XnatTransport

__all__ = [
    "FileListing",
    "RemoteFile",
    "Resource",
    "XnatTransport",
    "file_listing",
    "file_url_path",
    "parse_date",
    "resource_names",
    "server_url",
    "zip_names",
]
# Imported on first use: the download command needs only XNAT's naming rules from here.
_LAZY = {
    "FileListing": "refs",
    "RemoteFile": "refs",
    "Resource": "refs",
    "file_listing": "refs",
    "XnatTransport": "transport",
}


def __getattr__(name: str) -> Any:
    """Import ``XnatTransport`` (and the transport machinery) or a reference type on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
