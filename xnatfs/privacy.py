"""Who may read the cache and the log: the user alone, or a group that was chosen on purpose.

A cache holds downloaded images and its log holds request paths (project and subject labels),
so by default everything in it is the user's alone: folders 0700, files 0600. A cache directory
that is already group-owned with the setgid bit (``chgrp lab DIR && chmod 2770 DIR``) is an
explicit choice to share it with that group: it keeps group access (folders 2770, files 0660).
"""

from __future__ import annotations

import contextlib
import os
import stat


def is_group_shared(directory: str) -> bool:
    """Return True if ``directory`` exists and has the setgid bit: a cache shared by its group."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_ISGID)
    except OSError:
        return False


def dir_mode(shared: bool) -> int:
    """Return the mode of a cache folder (before the umask)."""
    return 0o2770 if shared else 0o700


def file_mode(shared: bool) -> int:
    """Return the mode of a cache file (before the umask)."""
    return 0o660 if shared else 0o600


def process_umask(shared: bool) -> int:
    """Set the umask of this process for a cache (0o007 shared, else 0o077); return the old one.

    The mount daemon calls it: every file it creates (content, metadata, log) is then private.
    """
    return os.umask(0o007 if shared else 0o077)


def secure_dir(path: str, shared: bool) -> None:
    """Create folder ``path`` if needed and, if it is ours, give it the cache's folder mode.

    Folders above it that are created too get the same mode. Raises OSError.
    """
    mode = dir_mode(shared)
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def private_file(path: str, shared: bool = False) -> None:
    """Create file ``path`` if missing with the cache's file mode; tighten it if it is ours.

    Used for the log before anything writes to it. Raises OSError.
    """
    mode = file_mode(shared)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & ~mode:
            with contextlib.suppress(OSError):
                os.fchmod(fd, mode)
    finally:
        os.close(fd)
