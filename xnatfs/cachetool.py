"""``xnatfs cache du|clean|verify``: look after a cache directory (mounted or not).

Works on the files of the cache (:meth:`Cache.entries`, :meth:`Cache.remove`), so it is safe
next to live mounts: an entry being downloaded is never removed, and a removed entry's files
that are open stay readable (the mount downloads the resource again on its next open).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import time
from collections import defaultdict
from typing import Any, TextIO

from xnatfs.cache import Cache, EntryInfo, default_cache_dir
from xnatfs.exceptions import XnatfsError
from xnatfs.options import TIMEOUT
from xnatfs.progress import human_bytes

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Return seconds for ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a plain number of seconds.

    Raises ValueError.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 30d, 12h, 90m)")
    return float(match[1]) * UNITS[match[2] or "s"]


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``xnatfs cache ACTION``; return the exit status."""
    cache = Cache(args.cache_dir or default_cache_dir())
    if args.action == "du":
        return du(cache, out)
    if args.action == "clean":
        older = parse_duration(args.older_than) if args.older_than else None
        return clean(cache, out, older_than=older, to_size=args.to)
    return verify(cache, out, timeout=args.timeout)


def _owner(key: tuple[str, ...]) -> tuple[str, str]:
    """Return ``(server, project)`` of an entry key (a PACS has no projects: its study UID's owner is "-")."""
    if key and key[0] == "xnat" and len(key) > 2:
        return key[1], key[2]
    return (key[1] if len(key) > 1 else "?"), "-"


def du(cache: Cache, out: TextIO) -> int:
    """Write the size of the cache per server and project; return 0."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    entries = cache.entries()
    for entry in entries:
        group = groups[_owner(entry.key)]
        group[0] += entry.size
        group[1] += 1
    out.write(f"{'SIZE':>10}  {'ENTRIES':>7}  SERVER  PROJECT\n")
    for (server, project), (size, count) in sorted(groups.items()):
        out.write(f"{human_bytes(size):>10}  {count:>7}  {server}  {project}\n")
    total = sum(e.size for e in entries)
    out.write(f"{human_bytes(total):>10}  {len(entries):>7}  total in {cache.directory}\n")
    return 0


def clean(cache: Cache, out: TextIO, older_than: float | None = None, to_size: int | None = None) -> int:
    """Remove entries not used for ``older_than`` seconds, then least recently used ones until
    ``to_size`` bytes are left; everything when neither is given. Returns 0."""
    entries = cache.entries()  # least recently used first
    now = time.time()
    doomed: list[EntryInfo] = []
    if older_than is None and to_size is None:
        doomed = list(entries)
    else:
        if older_than is not None:
            doomed = [e for e in entries if now - e.last_used >= older_than]
        if to_size is not None:
            left = sum(e.size for e in entries if e not in doomed)
            for entry in entries:
                if left <= to_size:
                    break
                if entry not in doomed:
                    doomed.append(entry)
                    left -= entry.size
    removed = freed = busy = 0
    for entry in doomed:
        if cache.remove(entry.base):
            removed += 1
            freed += entry.size
        else:
            busy += 1
    kept = len(entries) - removed
    note = f" ({busy} being downloaded were left alone)" if busy else ""
    out.write(f"removed {removed} entries ({human_bytes(freed)}); {kept} left ({human_bytes(cache.size())}){note}\n")
    return 0


def verify(cache: Cache, out: TextIO, timeout: float = TIMEOUT) -> int:
    """Re-check every XNAT entry against the digests and sizes of the server's files listing;
    remove the bad ones. Returns 0 if every entry checked out, 1 if some were bad (and removed)
    or could not be checked (server unreachable, no digests)."""
    sessions: dict[str, Any] = {}
    good = bad = unchecked = 0
    try:
        for entry in cache.entries():
            try:
                problem = _check(entry, sessions, timeout)
            except (XnatfsError, OSError) as error:
                out.write(f"unchecked  {_name(entry)}: {error}\n")
                unchecked += 1
                continue
            if problem is None:
                good += 1
            elif problem.startswith("unchecked"):
                out.write(f"{problem.split(':')[0]:<9}  {_name(entry)}:{problem.split(':', 1)[1]}\n")
                unchecked += 1
            else:
                removed = cache.remove(entry.base)
                out.write(f"bad        {_name(entry)}: {problem}{' (removed)' if removed else ' (busy, kept)'}\n")
                bad += 1
    finally:
        for session in sessions.values():
            session.close()
    out.write(f"verified {good + bad + unchecked} entries: {good} good, {bad} bad, {unchecked} unchecked\n")
    return 0 if bad == 0 and unchecked == 0 else 1


def _name(entry: EntryInfo) -> str:
    return "/".join(p for p in entry.key[1:] if p)


def _check(entry: EntryInfo, sessions: dict[str, Any], timeout: float) -> str | None:
    """Return None if ``entry`` matches the server's listing, else what is wrong ("unchecked: ..."
    when it cannot be checked). Raises XnatfsError when the server cannot be asked."""
    if entry.key[0] != "xnat" or len(entry.key) != 6:
        return "unchecked: no digests for this kind of entry"
    from xnatfs.client import XnatClient
    from xnatfs.credentials import resolve_credentials
    from xnatfs.transports.xnat import Resource, file_listing

    _, server, project, experiment, scan, label = entry.key
    session = sessions.get(server)
    if session is None:
        user, password = resolve_credentials(server)
        session = sessions[server] = XnatClient(server, user, password, timeout=timeout)
    resource = Resource(project, experiment, scan or None, label)
    listing = file_listing(resource, session.get_rows(resource.api_path + "/files"))
    if listing.version != entry.version:
        return "unchecked: outdated (the server's files changed since; a mount downloads them anew)"
    for remote in listing.files.values():
        local = os.path.join(entry.base, remote.cache_path)
        try:
            size = os.path.getsize(local)
        except OSError:
            return f"{remote.cache_path} is missing"
        if size != remote.size:
            return f"{remote.cache_path} has {size} bytes, the server lists {remote.size}"
        if remote.digest and _md5(local) != remote.digest.lower():
            return f"{remote.cache_path} does not match its digest"
    return None


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
