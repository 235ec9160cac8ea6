"""mfusepy, loaded on libfuse 3 whatever else the machine has.

mfusepy looks for ``libfuse.so.2`` before ``libfuse.so.3``, and libfuse 2 is on most desktops
(AppImages need it). On the FUSE 2 API xnatfs loses ``init_with_config``: no inode numbers of its
own, no attribute, entry or negative timeouts, no skipped opens, no kernel invalidation. So the
library is chosen here, before mfusepy is imported anywhere: ``FUSE_LIBRARY_PATH`` set by the user
wins; otherwise libfuse 3, and a clear error when it is missing.

Import mfusepy through this module (``from xnatfs.fuse import mfusepy``), never directly.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess

from xnatfs.exceptions import XnatfsError


class FuseLibraryMissing(XnatfsError):
    """libfuse 3 is not installed."""


def find_libfuse3() -> str | None:
    """Return the path (or soname) of libfuse 3, or None when it is not installed."""
    try:
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith("libfuse3.so.3") and os.path.exists(target):
            return target
    return ctypes.util.find_library("fuse3")


def _choose_library() -> str:
    chosen = os.environ.get("FUSE_LIBRARY_PATH")
    if chosen:
        return chosen
    found = find_libfuse3()
    if found is None:
        raise FuseLibraryMissing(
            "libfuse 3 is not installed (Debian/Ubuntu: apt-get install fuse3); xnatfs needs libfuse 3, not 2"
        )
    os.environ["FUSE_LIBRARY_PATH"] = found  # mfusepy reads it at import; daemons inherit it
    return found


LIBRARY = _choose_library()

import mfusepy  # noqa: E402  (must come after the library is chosen)

__all__ = ["LIBRARY", "FuseLibraryMissing", "find_libfuse3", "mfusepy"]
