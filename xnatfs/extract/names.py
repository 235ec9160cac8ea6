"""Member names: which names an archive may hold (no escape from the destination, no surprises)."""

from __future__ import annotations

import re

from xnatfs.exceptions import UnsafeArchiveError

MAX_NAME_BYTES = 1024

MAX_COMPONENT_BYTES = 255

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def check_member_name(name: str) -> str:
    """Return ``name`` as a normalized relative path (``./a//b/`` -> ``a/b``).

    Raises UnsafeArchiveError if it is empty, absolute, starts with a drive letter, has a ``..`` component,
    a backslash, NUL or another control character, or is longer than MAX_NAME_BYTES (a component longer
    than MAX_COMPONENT_BYTES).
    """
    if _CONTROL_CHARS.search(name):
        raise UnsafeArchiveError(f"entry name with a NUL or control character: {name!r}")
    if "\\" in name:
        raise UnsafeArchiveError(f"entry name with a backslash: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"absolute entry name: {name!r}")
    if _DRIVE_LETTER.match(name):
        raise UnsafeArchiveError(f"entry name with a drive letter: {name!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"entry name with a '..' component: {name!r}")
    if not parts:
        raise UnsafeArchiveError(f"empty entry name: {name!r}")
    try:
        too_long = len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or any(
            len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES for part in parts
        )
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"entry name that cannot be encoded: {name!r}") from None
    if too_long:
        raise UnsafeArchiveError(f"entry name too long: {name[:80]!r}...")
    return "/".join(parts)
