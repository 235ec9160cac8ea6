"""Exceptions of xnatfs.

Every error a user can meet is an :class:`XnatfsError`. Each one also derives from the
built-in exception that says the same thing (``FileNotFoundError``, ``PermissionError``, ...),
so the mount can turn any of them into the right errno with one ``isinstance`` check and
callers can catch either family.
"""

from __future__ import annotations

import errno


class XnatfsError(Exception):
    """Base class of all xnatfs errors. ``errno`` is what the mount answers for it.

    Takes one message. ``Exception.__init__`` is called directly so that the subclasses that are also
    an ``OSError`` keep the message as it is (not as an errno/strerror pair); ``str()`` of one made
    without a message is ``default_message``.
    """

    errno: int = errno.EIO
    default_message = "xnatfs error"

    def __init__(self, message: object = "") -> None:
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args and self.args[0] else self.default_message


class NotFoundError(XnatfsError, FileNotFoundError):
    """The server (or transport) has no object at that address (HTTP 404)."""

    errno = errno.ENOENT
    default_message = "not found"


class AccessDeniedError(XnatfsError, PermissionError):
    """The server refused access to an object (HTTP 403)."""

    errno = errno.EACCES
    default_message = "access denied"


class AuthenticationError(XnatfsError):
    """The credentials were refused (HTTP 401 after a fresh login)."""

    errno = errno.EACCES


class ServerError(XnatfsError):
    """The server answered with an error status (5xx after retries, or an unexpected status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionFailedError(XnatfsError, ConnectionError):
    """The server could not be reached, or stopped answering within the timeout."""

    default_message = "connection failed"


class UnsafeArchiveError(XnatfsError, ValueError):
    """A ZIP archive holds an entry that must not be extracted (path escape, symlink, bomb, bad CRC...)."""

    default_message = "unsafe archive"


class IncompleteDownloadError(XnatfsError):
    """A download ended before all of its data had arrived."""


class UploadError(XnatfsError):
    """An upload failed or arrived damaged; ``kept_at`` is a local file that still holds the data."""

    def __init__(self, message: str, kept_at: str) -> None:
        super().__init__(message)
        self.kept_at = kept_at
