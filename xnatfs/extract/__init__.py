"""Safe ZIP extraction, from a file on disk or from a byte stream while it is still arriving.

XNAT sends a ZIP as it builds it: entries are STORED, each with its CRC and sizes in its local header, so
every entry can be written out as soon as its bytes have arrived. A site set to compress sends DEFLATE entries
whose CRC and sizes follow the data (a data descriptor): a deflate stream ends by itself, so those are
streamed too, and checked against their descriptor. ZIP64 is read as Java's ZipOutputStream writes it
(a ZIP64 extra field in the local header of a STORED entry of 4 GiB or more; a 64-bit data descriptor, without
that extra field, after a DEFLATE entry that grew past 4 GiB; a ZIP64 end record past 65,535 entries).
Three ways in:

* :func:`extract_zip` - a whole archive on disk, checked completely before anything is written;
* :class:`StreamingExtractor` - bytes fed as they arrive; a caller can wait for one member;
* :func:`extract_stream` - a stream into a fresh folder, all or nothing.

What is refused (always :class:`UnsafeArchiveError`): names that are absolute, carry a drive letter, a ``..``
component, a backslash, NUL or another control character, are empty or too long; entries that are symlinks,
devices, FIFOs or sockets; duplicate names (after normalization) and a file where another entry needs a
directory; overlapping entries; encrypted entries and compression methods other than STORED and DEFLATE;
more entries or more bytes than :class:`ExtractLimits` allows, counted on the bytes actually decompressed; a
bad CRC; a target path that already exists or runs through a symlink; a central directory that disagrees
with the entries. Nothing is ever written through a symlink, and no symlink is ever created.

Names are compared exactly (case-sensitive, like the Linux file systems the cache lives on). On a
case-insensitive file system two names that differ only in case still cannot overwrite each other: every
file is created with ``O_EXCL`` and linked into place with a link that fails if the target exists.

The parts: :mod:`.names` (name checks), :mod:`.writer` (the atomic writer), :mod:`.stream` (the stream
parser), :mod:`.directory` (the central-directory reader), :mod:`.records` (ZIP records and limits).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable

from xnatfs.exceptions import UnsafeArchiveError
from xnatfs.extract.directory import _extract_planned, _plan, _read_directory
from xnatfs.extract.names import check_member_name
from xnatfs.extract.records import ExtractLimits, MapName
from xnatfs.extract.stream import StreamingExtractor
from xnatfs.extract.writer import _Output

__all__ = [
    "ExtractLimits",
    "StreamingExtractor",
    "check_member_name",
    "extract_stream",
    "extract_zip",
]


def extract_zip(
    zip_path: str,
    dest_dir: str,
    limits: ExtractLimits = ExtractLimits(),
    map_name: MapName | None = None,
) -> list[str]:
    """Extract the archive at ``zip_path`` into ``dest_dir``, which must not exist yet; all or nothing.

    Every entry is checked before anything is written; the entries are then extracted into a staging folder
    next to ``dest_dir`` and published by renaming it. ``map_name(normalized_name)`` may return another
    relative path (checked again) or None to skip the entry.
    Returns the relative paths written (files and directory entries), in archive order.
    Raises FileExistsError if ``dest_dir`` exists, UnsafeArchiveError for a hostile or corrupt archive;
    after any failure ``dest_dir`` does not exist and the staging folder is gone.
    """
    dest_dir = os.path.abspath(dest_dir)
    _refuse_existing(dest_dir)
    with open(zip_path, "rb") as archive:
        infos, directory_start = _read_directory(archive)
        staging = _make_staging(dest_dir)
        try:
            output = _Output(staging, limits, map_name)
            try:
                if len(infos) > limits.max_entries:
                    raise UnsafeArchiveError(f"more than {limits.max_entries} entries")
                plan = _plan(infos, archive, 0, directory_start, output)
                written = [path for path in _extract_planned(archive, plan, output) if path is not None]
            finally:
                output.close()
            _move_into_place(staging, dest_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return written


def extract_stream(
    chunks: Iterable[bytes],
    dest_dir: str,
    limits: ExtractLimits = ExtractLimits(),
    map_name: MapName | None = None,
) -> list[str]:
    """Extract a ZIP arriving as ``chunks`` into ``dest_dir``, which must not exist yet; all or nothing.

    Returns the relative paths written. Raises FileExistsError if ``dest_dir`` exists, UnsafeArchiveError
    for hostile content, IncompleteDownloadError if the stream ends early, or whatever ``chunks`` raises;
    after any failure ``dest_dir`` does not exist and the staging folder is gone.
    """
    dest_dir = os.path.abspath(dest_dir)
    _refuse_existing(dest_dir)
    staging = _make_staging(dest_dir)
    extractor: StreamingExtractor | None = None
    try:
        extractor = StreamingExtractor(staging, limits, map_name, spool_dir=os.path.dirname(dest_dir))
        for chunk in chunks:
            extractor.feed(chunk)
        written = extractor.finish()
        _move_into_place(staging, dest_dir)
    except BaseException as exc:
        if extractor is not None:
            extractor.fail(exc)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _refuse_existing(dest_dir: str) -> None:
    if os.path.lexists(dest_dir):
        raise FileExistsError(errno.EEXIST, "destination already exists", dest_dir)


def _make_staging(dest_dir: str) -> str:
    """Create a private staging folder next to ``dest_dir`` (same file system, so rename is atomic)."""
    parent, base = os.path.split(dest_dir)
    return tempfile.mkdtemp(prefix=f".{base[:100]}.staging-", dir=parent)


def _move_into_place(staging: str, dest_dir: str) -> None:
    """Rename ``staging`` to ``dest_dir``; FileExistsError if ``dest_dir`` appeared meanwhile."""
    os.chmod(staging, 0o755)
    # rename() silently replaces an empty folder, hence the check; a non-empty one makes it fail.
    _refuse_existing(dest_dir)
    try:
        os.rename(staging, dest_dir)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "destination already exists", dest_dir) from exc
        raise
