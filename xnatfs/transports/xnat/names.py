"""XNAT's naming rules: file paths in URLs and ZIPs, resource folder names, dates, server URLs."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from xnatfs.exceptions import XnatfsError

if TYPE_CHECKING:
    from xnatfs.transports.xnat.refs import FileListing, RemoteFile, Resource

# The path of a file inside an XNAT ZIP, after its resource's "files" folder.
_ZIP_MEMBER = re.compile(r"^[^/]+/(?:scans/[^/]+/|assessors/[^/]+/out/)?resources/[^/]+/files/(.+)$")
# Characters XNAT takes literally in a file path (RFC 3986 path characters other than "%").
_PATH_SAFE = "/!$&'()*+,;=:@-._~"


def file_url_path(server_path: str) -> str:
    """Return ``server_path`` as XNAT needs it after ``files/`` to mean exactly that stored name.

    XNAT takes the path as sent unless it contains ``%20`` or ``%2B``; then it URL-decodes all of it
    (``+`` as a space). A path of plain URL characters goes as it is (``a(1).nii``); one with a space
    or a ``+`` and anything else is encoded completely. Raises ValueError for a name XNAT cannot be
    told (characters that need encoding, but neither a space nor a ``+`` to make XNAT decode).
    """
    if all(c.isascii() and (c.isalnum() or c in _PATH_SAFE) for c in server_path):
        return server_path
    encoded = quote(server_path, safe="/")
    if "%20" in encoded or "%2B" in encoded:
        return encoded
    raise ValueError(f"{server_path!r}: XNAT cannot store or serve this name through its REST API")


def zip_names(resource: Resource, listing: FileListing) -> dict[str, str]:
    """Return {path below ``files/`` in the resource's ZIP: cache path} for the listed files.

    A ZIP name that two listed files would both get is left out (neither can be told from it).
    """
    found: dict[str, list[str]] = {}
    for remote in listing.files.values():
        found.setdefault(resource.zip_name(remote.server_path), []).append(remote.cache_path)
    return {name: paths[0] for name, paths in found.items() if len(paths) == 1}


def resource_names(rows: list[dict[str, str]]) -> list[str]:
    """Return a folder name for each resource row (same order), deterministic and unique.

    The label, except: a resource without a label is named by its ID; of several resources with
    one label, the one with the lowest ID keeps it and the others are ``{label}~{ID}``.
    """

    def id_key(row: dict[str, str]) -> tuple[int, str]:
        rid = str(row.get("xnat_abstractresource_id") or "")
        return (int(rid) if rid.isdigit() else 0, rid)

    names: dict[int, str] = {}
    taken: set[str] = set()
    for index, row in sorted(enumerate(rows), key=lambda pair: id_key(pair[1])):
        label = str(row.get("label") or "")
        rid = str(row.get("xnat_abstractresource_id") or "")
        name = label if label and label not in taken else f"{label}~{rid}" if label else rid
        taken.add(label)
        names[index] = name
    return [names[i] for i in range(len(rows))]


def parse_date(text: str | None) -> float | None:
    """Return epoch seconds of an XNAT date ("2024-01-31" or "2024-01-31 12:00:00.0"), or None."""
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), fmt).timestamp()
        except ValueError:
            continue
    return None


def server_url(url: str | None, netloc: str | None = None, root: str | None = None) -> str:
    """Return the HTTP(S) base URL of a source URL (``xnat://`` means https)."""
    if url:
        parts = urlsplit(url)
        scheme = "https" if parts.scheme == "xnat" else parts.scheme
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    if not netloc:
        raise XnatfsError("an XNAT transport needs a server address")
    return f"https://{netloc}{(root or '').rstrip('/')}"


def version_fraction(file: RemoteFile) -> float:
    """Return a fraction of a second (1 µs to 1 s) derived from the file's digest, 0 without one.

    XNAT lists no date per file, so files get their session's date; this fraction makes the mtime
    change when the content changes, which is what makes the kernel drop cached pages of the old
    content (sizes alone miss a change of the same length).
    """
    if not file.digest:
        return 0.0
    return (int(hashlib.sha1(file.digest.encode()).hexdigest()[:8], 16) % 999_999 + 1) / 1e6


def join(parts: list[str]) -> str:
    return "/" + "/".join(parts)
