"""Local folder transport: ``file:///abs/path`` shows a folder of this machine, confined to it.

Content is the real files (no copy, no cache). Every path is resolved with :func:`os.path.realpath`
and refused (PermissionError) if it lands outside the root -- through ``..`` or through a symbolic
link inside the root that points outside. Symbolic links that stay inside the root behave as
their targets; listings leave out links that leave the root, links that would make a walk loop
(a link to a folder the walk is already in), and special files (FIFOs, sockets, devices).

Opened with mode ``w`` (``get_transport(url, mode='w')``) the transport also writes: ``open(path,
'w'|'x'|'a')`` returns a binary file; ``x`` fails if the file exists.

A root that is a file (allowed unless ``read_directory_only``) gives a tree holding that file only.
Listings are trusted for 1 second by default (``ttl`` option), a local folder being cheap to list.
"""

from __future__ import annotations

import errno
import io
import os
import stat as stat_module
from typing import IO

from xnatfs import __version__
from xnatfs.transports.base import ROOT, AbstractTransport, Entry, RootIsNotDirectory, normpath

_WRITE_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


class FileTransport(AbstractTransport):
    """A local folder (or a single file) as a transport tree, never reaching outside its root."""

    name = "file"
    description = "Local folder: the real files, confined to the root folder"
    authors = "xnatfs developers"
    version = __version__
    url = "https://pypi.org/project/xnatfs/"
    schemes = ["file"]
    options = ()  # command-line options of its own (xnatfs.options.Option)
    needs_credentials = False
    persistent_catalog = False  # the folder itself is at hand: a catalog could only be out of date
    default_ttl = 1.0  # a local folder is cheap to list
    hide_probe_names = False  # real dot-files

    def _setup(self) -> None:
        """Open the local folder ``root`` (an absolute path).

        Raises ValueError for a relative root or a remote host in the URL, FileNotFoundError if
        ``root`` does not exist, RootIsNotDirectory if it is not a folder and
        ``read_directory_only`` is set.
        """
        if self.netloc not in (None, "", "localhost"):
            raise ValueError(f"file:// URLs name a local path; remote host {self.netloc!r} is not supported")
        root = self.root or "/"
        if not os.path.isabs(root):
            raise ValueError(f"the root of a file transport must be an absolute path (got {root!r})")
        real = os.path.realpath(root)
        if not os.path.exists(real):
            raise FileNotFoundError(errno.ENOENT, "root of the file transport does not exist", root)
        if os.path.isdir(real):
            self.base, self.single = real, None
        elif self.read_directory_only:
            raise RootIsNotDirectory(f"{root} is not a folder")
        else:
            self.base, self.single = os.path.dirname(real), os.path.basename(real)

    # -- confinement --------------------------------------------------------------------------

    def real_path(self, path: str) -> str:
        """Return the real (symlink-free) local path of tree path ``path``.

        The target need not exist. Raises PermissionError if it resolves outside the root,
        FileNotFoundError if the root is a single file and ``path`` names another one.
        """
        parts = [p for p in normpath(path).split("/") if p]
        if self.single is not None and parts and parts[0] != self.single:
            raise FileNotFoundError(errno.ENOENT, "not in the tree", path)
        real = os.path.realpath(os.path.join(self.base, *parts))
        if not self._inside(real):
            raise PermissionError(errno.EACCES, "path resolves outside the root of the file transport", path)
        return real

    def _inside(self, real: str) -> bool:
        if self.single is not None:
            single = os.path.join(self.base, self.single)
            return real == single or real == self.base
        return real == self.base or real.startswith(self.base.rstrip(os.sep) + os.sep)

    # -- primitives ---------------------------------------------------------------------------

    def _list(self, path: str) -> list[Entry]:
        """Return the folders and regular files of folder ``path``, sorted by name.

        Leaves out links that resolve outside the root or to a folder ``path`` is inside of, and
        special files. Raises FileNotFoundError, NotADirectoryError, PermissionError.
        """
        real = self.real_path(path)
        if not os.path.isdir(real):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)
        ancestors = self._ancestors(path)
        entries = []
        with os.scandir(real) as scan:
            for item in scan:
                if self.single is not None and item.name != self.single:
                    continue
                target = item.path
                if item.is_symlink():
                    target = os.path.realpath(item.path)
                    if not self._inside(target) or target in ancestors:
                        continue
                try:
                    st = os.stat(target)
                except OSError:  # dangling link, or removed since the scan
                    continue
                if stat_module.S_ISDIR(st.st_mode) or stat_module.S_ISREG(st.st_mode):
                    entries.append(_entry(item.name, st))
        return sorted(entries, key=lambda e: e.name)

    def _ancestors(self, path: str) -> set[str]:
        """Return the real paths of ``path`` and of every folder above it in the tree."""
        parts = [p for p in normpath(path).split("/") if p]
        return {self.real_path("/" + "/".join(parts[:n])) for n in range(len(parts) + 1)}

    def _fetch(self, path: str, entry: Entry) -> str:
        """Return the real local path of file ``path`` (the file itself: no copy).

        Raises PermissionError if it resolves outside the root, FileNotFoundError if it is gone.
        """
        real = self.real_path(path)
        if not os.path.isfile(real):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return real

    def _lookup(self, path: str) -> Entry | None:
        """Return the entry of ``path`` from the file itself (not from a listing); None for special
        files and missing paths. Raises PermissionError outside the root."""
        if path == "/":
            return ROOT
        try:
            st = os.stat(self.real_path(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (stat_module.S_ISDIR(st.st_mode) or stat_module.S_ISREG(st.st_mode)):
            return None
        return _entry(path.rsplit("/", 1)[-1], st)

    def _open_write(self, path: str, mode: str) -> IO[bytes]:
        """Return a binary file open for writing ``path``: mode ``w`` (truncate), ``x`` or ``a``.

        Raises PermissionError outside the root, FileExistsError for ``x`` on an existing file,
        FileNotFoundError if the parent folder does not exist, IsADirectoryError for a folder.
        """
        if mode not in _WRITE_FLAGS:
            raise ValueError(f"unsupported write mode {mode!r}")
        if normpath(path) == "/":
            raise IsADirectoryError(errno.EISDIR, "the root is a folder", path)
        real = self.real_path(path)
        # O_NOFOLLOW: the resolved path must not have become a link since it was checked.
        fd = os.open(real, _WRITE_FLAGS[mode] | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        return io.FileIO(fd, "a" if mode == "a" else "w", closefd=True)

    def metadata(self, path: str) -> dict[str, str]:
        """Return ``{"file.path": the real local path}`` of ``path``. Raises FileNotFoundError."""
        self.stat(path)
        return {"file.path": self.real_path(path)}


def _entry(name: str, st: os.stat_result) -> Entry:
    is_dir = stat_module.S_ISDIR(st.st_mode)
    return Entry(
        name=name,
        is_dir=is_dir,
        size=0 if is_dir else st.st_size,
        mtime=st.st_mtime,
        key=f"{st.st_dev}:{st.st_ino}",
    )
