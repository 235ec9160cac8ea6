"""Names: XNAT's folder naming and safe, unique path components for names that come from a server."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_NOT_WORD = re.compile(r"[^A-Za-z0-9_]")
# Characters that are never kept in a path component: the separator, NUL and other control characters.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
MAX_COMPONENT_BYTES = 255


def scan_folder(scan_id: str, scan_type: str | None) -> str:
    """Return the folder name XNAT uses for a scan inside its ZIPs: ``{ID}-{type}``.

    Every character of the type outside ``[A-Za-z0-9_]`` becomes ``_``; an empty type gives ``{ID}``.
    """
    scan_type = (scan_type or "").strip()
    if not scan_type:
        return scan_id
    return f"{scan_id}-{_NOT_WORD.sub('_', scan_type)}"


def safe_component(name: str) -> str:
    """Return ``name`` made safe as one path component, deterministically.

    Separators, NUL and control characters become ``_``; ``""``, ``.`` and ``..`` get a ``_`` prefix;
    a name longer than 255 bytes is shortened and tagged with a digest of the original.
    A name that is already safe comes back unchanged.
    """
    safe = _UNSAFE.sub("_", name)
    if safe in ("", ".", ".."):
        safe = "_" + safe
    if len(safe.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
        tag = "~" + _digest(name)
        encoded = safe.encode("utf-8", "surrogateescape")[: MAX_COMPONENT_BYTES - len(tag)]
        safe = encoded.decode("utf-8", "ignore") + tag
    return safe


def unique_names(names: Iterable[str]) -> list[str]:
    """Return safe, unique components for ``names`` (same order).

    A name whose safe form is taken by an earlier one (or by a name that was already safe) gets
    ``~{digest of the original}`` appended, so the result depends only on the set of names.
    """
    names = list(names)
    safe = [safe_component(n) for n in names]
    # Names that are safe as they are keep their form; changed or clashing ones get a tag.
    kept = {s for n, s in zip(names, safe) if n == s}
    result: list[str] = []
    seen: set[str] = set()
    for original, candidate in zip(names, safe):
        if candidate in seen or (candidate != original and candidate in kept):
            candidate = safe_component(f"{candidate}~{_digest(original)}")
        seen.add(candidate)
        result.append(candidate)
    return result


def safe_relpath(path: str) -> str:
    """Return a relative path whose every component is made safe (``a/../b`` -> ``a/_../b``)."""
    return "/".join(safe_component(part) for part in path.split("/") if part != "")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
