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

    Every xnatfs error holds one message, also those that are OSErrors (``OSError`` would read
    two arguments as errno and strerror, and its ``errno`` would hide the class's).
    """

    errno: int = errno.EIO

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0])


class NotFoundError(XnatfsError, FileNotFoundError):
    """The server (or transport) has no object at that address (HTTP 404)."""

    errno = errno.ENOENT


class AccessDeniedError(XnatfsError, PermissionError):
    """The server refused access to an object (HTTP 403)."""

    errno = errno.EACCES


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


class UnsafeArchiveError(XnatfsError, ValueError):
    """A ZIP archive holds an entry that must not be extracted (path escape, symlink, bomb, bad CRC...)."""


class IncompleteDownloadError(XnatfsError):
    """A download ended before all of its data had arrived."""


class UploadError(XnatfsError):
    """An upload failed or arrived damaged; ``kept_at`` is a local file that still holds the data."""

    def __init__(self, message: str, kept_at: str) -> None:
        super().__init__(message)
        self.kept_at = kept_at
