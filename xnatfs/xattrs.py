"""Metadata as read-only extended attributes (``getfattr -d``, ``os.getxattr``).

Every name is ``user.`` + a key of :meth:`AbstractTransport.metadata` (``user.xnat.uri``,
``user.dicom.StudyInstanceUID``, ...), plus ``user.xnatfs.cached`` (``0``/``1``) on files.
The root also answers ``user.xnatfs.control`` (not listed): the control socket of the mount,
which is how ``xnatfs status`` and ``xnatfs prefetch`` find the daemon. Nothing here downloads
content; names outside ``user.`` are answered "no such attribute" without asking the transport.
"""

from __future__ import annotations

from xnatfs.transports.base import AbstractTransport, normpath

PREFIX = "user."
CACHED = "user.xnatfs.cached"
CONTROL = "user.xnatfs.control"


def attributes(transport: AbstractTransport, path: str) -> dict[str, str]:
    """Return the extended attributes of ``path`` by name. Raises FileNotFoundError."""
    found = {PREFIX + key: value for key, value in transport.metadata(path).items()}
    if not transport.stat(path).is_dir:
        found[CACHED] = "1" if transport.is_cached(path) else "0"
    return found


def value(transport: AbstractTransport, path: str, name: str) -> bytes | None:
    """Return the value of attribute ``name`` of ``path`` (None if it has none). Raises FileNotFoundError."""
    if not name.startswith(PREFIX):
        return None  # security.*, system.posix_acl_*: asked by ls -l on every file, answered at once
    if name == CONTROL and normpath(path) == "/":
        socket = transport.opts.get("control_socket")
        return socket.encode() if socket else None
    found = attributes(transport, path).get(name)
    return None if found is None else found.encode("utf-8", "surrogateescape")
