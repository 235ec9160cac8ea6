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
file is created with ``O_EXCL`` and published with a link that fails if the target exists.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from xnatfs.exceptions import IncompleteDownloadError, UnsafeArchiveError

try:  # ISA-L: zlib's API, with CRC-32 about 5x and inflation about 1.6x faster (the CPU of a cold read)
    from isal import isal_zlib as zlib
except ImportError:  # pragma: no cover - isal is a dependency; plain zlib does the same, slower
    import zlib

__all__ = [
    "ExtractLimits",
    "StreamingExtractor",
    "check_member_name",
    "extract_stream",
    "extract_zip",
]

MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
# The compression ratio is only judged past this size: tiny files compress absurdly well and harm nobody.
RATIO_GRACE_BYTES = 1 << 20

_CHUNK = 1 << 20  # bytes read from an archive on disk at a time, and inflated at a time
_STORED, _DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
_FLAG_ENCRYPTED = 0x1
_FLAG_DATA_DESCRIPTOR = 0x8
_FLAG_UTF8 = 0x800
_LOCAL_SIGNATURE = b"PK\x03\x04"
# What may follow the last entry: the central directory, or (no entries) an end record.
_DIRECTORY_SIGNATURES = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")
_END_SIGNATURE = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_END_SEARCH_BYTES = _END_RECORD_SIZE + 65535  # an end record and the longest comment
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_HOLE_MIN = 4096  # zero runs at least this long, in one piece of output, are written as holes
_ZEROS = bytes(_CHUNK)
# A DEFLATE entry with a data descriptor has no known length: its ratio is judged on the bytes read so far
# once it has written this much (a legitimate file may start with a long run of zeros), and on the whole
# entry at its end.
STREAMED_RATIO_GRACE_BYTES = 64 << 20
_ZIP64_EXTRA = 0x0001
_ZIP64_MARK = 0xFFFFFFFF

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_TYPES = {
    stat.S_IFLNK: "symlink",
    stat.S_IFBLK: "block device",
    stat.S_IFCHR: "character device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "regular file",
}


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on one archive; sizes are bytes actually decompressed, not the sizes the archive declares."""

    max_entries: int = 100_000
    max_entry_size: int = 16 * 2**30
    max_total_size: int = 64 * 2**30
    max_ratio: float = 200.0  # decompressed / compressed per entry, judged once past RATIO_GRACE_BYTES


MapName = Callable[[str], str | None]


@dataclass(frozen=True)
class _Declared:
    """What an archive declares about one entry (local header or central directory)."""

    name: str
    method: int
    crc: int
    compressed: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")

    @classmethod
    def of(cls, info: zipfile.ZipInfo) -> _Declared:
        return cls(info.orig_filename, info.compress_type, info.CRC, info.compress_size, info.file_size)


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
            _publish(staging, dest_dir)
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
        _publish(staging, dest_dir)
    except BaseException as exc:
        if extractor is not None:
            extractor.fail(exc)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


class StreamingExtractor:
    """Extracts a ZIP from a byte stream as it arrives, into ``dest_dir``, an existing private folder.

    Each member is written under a temporary name and renamed to its relative path only once its size and
    CRC are verified, so any member name present in ``dest_dir`` is complete. ``on_member(relpath)`` is
    called (from the feeding thread) each time a member is added to :attr:`members`.

    A DEFLATE entry whose CRC and sizes follow its data (data descriptor) is streamed too: it runs to the
    end of its deflate stream, then its descriptor (32- or 64-bit, with or without signature) must match
    what was inflated. A STORED entry with a data descriptor has no known end: from there on the stream is
    spooled to an unnamed temporary file in ``spool_dir`` (default: the parent of ``dest_dir``) and those
    entries are extracted by :meth:`finish`. The central directory is spooled the same way and checked
    against what was streamed.

    Entry types (symlink, device...) are only declared in the central directory: a streamed entry is
    always written as a regular file and an archive that declares it special is rejected by finish().
    After a failure, temporary files are gone; completed members stay in ``dest_dir`` (the caller discards
    it). The class does not rename or delete ``dest_dir``.
    """

    def __init__(
        self,
        dest_dir: str,
        limits: ExtractLimits = ExtractLimits(),
        map_name: MapName | None = None,
        on_member: Callable[[str], None] | None = None,
        spool_dir: str | None = None,
    ) -> None:
        self.dest_dir = os.path.abspath(dest_dir)
        self._limits = limits
        self._on_member = on_member
        self._spool_dir = spool_dir or os.path.dirname(self.dest_dir)
        self._output = _Output(self.dest_dir, limits, map_name)
        # Parser state; only touched under self._lock, by the feeding thread.
        self._lock = threading.RLock()
        self._offset = 0  # stream position of the next byte to parse
        self._header = bytearray()  # the header being collected
        self._header_start = 0
        self._need = 4  # header bytes needed before the next parsing step
        self._entry: _EntryWriter | _Skip | None = None  # the entry whose data is arriving
        self._entry_left: int | None = 0  # its bytes still to come; None: DEFLATE up to its end
        self._entry_start = 0  # stream position of its local header
        self._entry_name = ""
        self._descriptor: bool | None = None  # collecting a data descriptor: whether it is 64-bit
        self._zip64_descriptor = False  # the entry's local header has a ZIP64 extra field
        self._spool: BinaryIO | None = None
        self._spool_start = 0  # stream position of the spool's first byte
        # Stream position of each streamed local header -> what it declared, checked against the directory.
        self._streamed: dict[int, _Declared] = {}
        # Shared with waiting threads; guarded by self._cond.
        self._cond = threading.Condition()
        self._members: list[str] = []
        self._done: set[str] = set()
        self._finished = False
        self._error: BaseException | None = None

    @property
    def members(self) -> list[str]:
        """The relative paths completed so far (files and directory entries), in archive order."""
        with self._cond:
            return list(self._members)

    def feed(self, data: bytes) -> None:
        """Parse and write out the next bytes of the stream.

        Raises UnsafeArchiveError on hostile content (and then every later call raises it again).
        """
        with self._lock:
            self._check_usable()
            try:
                self._consume(memoryview(data).cast("B"))
            except BaseException as exc:
                self._abort(exc)
                raise

    def finish(self) -> list[str]:
        """End of stream: extract spooled entries, check the central directory; return all paths written.

        Raises IncompleteDownloadError if the stream ended inside an entry or before the end record,
        UnsafeArchiveError if the central directory disagrees with the stream or declares a special file.
        """
        with self._lock:
            self._check_usable()
            try:
                if self._spool is None:
                    if self._entry is not None:
                        raise IncompleteDownloadError(
                            f"the stream ended inside the entry at offset {self._header_start}"
                        )
                    raise IncompleteDownloadError("the stream ended before the central directory")
                self._finish_from_spool()
            except BaseException as exc:
                self._abort(exc)
                raise
            self._release()
            with self._cond:
                self._finished = True
                self._cond.notify_all()
                return list(self._members)

    def wait_for(self, relpath: str, timeout: float | None = None) -> str:
        """Block until member ``relpath`` is complete and return its absolute path.

        Raises the extraction's error if it failed (even for a member completed before the failure),
        FileNotFoundError if the stream finished without that member, TimeoutError after ``timeout`` seconds.
        """
        try:
            relpath = check_member_name(relpath)
        except UnsafeArchiveError:
            raise FileNotFoundError(errno.ENOENT, "no such member", relpath) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if relpath in self._done:
                    return os.path.join(self.dest_dir, relpath)
                if self._finished:
                    raise FileNotFoundError(errno.ENOENT, "no such member in the archive", relpath)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"member {relpath!r} not complete after {timeout} s")
                self._cond.wait(remaining)

    def fail(self, error: BaseException) -> None:
        """The producer failed: wake every waiter with ``error`` and remove temporary files.

        Does nothing if the extraction already finished or failed.
        """
        with self._cond:
            if self._finished or self._error is not None:
                return
            self._error = error
            self._cond.notify_all()
        with self._lock:  # waits for a feed() running in another thread
            self._release()

    # -- parsing -------------------------------------------------------------------------------------------

    def _consume(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self._spool is not None:
                self._spool.write(view[pos:])
                self._offset += end - pos
                return
            if self._entry is not None and self._descriptor is None:
                if self._entry_left is None:
                    assert isinstance(self._entry, _EntryWriter)
                    used = self._entry.inflate_to_end(view[pos:end])
                    pos += used
                    self._offset += used
                    if self._entry.ended:
                        self._expect_descriptor()
                    continue
                # Entry data goes straight from the caller's buffer to the entry: no copy, no buffering.
                take = min(self._entry_left, end - pos)
                self._entry.write(view[pos : pos + take])
                pos += take
                self._offset += take
                self._entry_left -= take
                if self._entry_left == 0:
                    self._complete_entry()
                continue
            if not self._header:
                self._header_start = self._offset
            take = min(self._need - len(self._header), end - pos)
            self._header += view[pos : pos + take]
            pos += take
            self._offset += take
            if len(self._header) == self._need:
                if self._descriptor is None:
                    self._parse_header()
                else:
                    self._parse_descriptor()

    def _parse_header(self) -> None:
        """Take the next step with the header bytes collected so far (signature, fixed part, whole header)."""
        header = self._header
        if self._need == 4:
            signature = bytes(header)
            if signature in _DIRECTORY_SIGNATURES:
                self._start_spool()
                return
            if signature != _LOCAL_SIGNATURE:
                raise UnsafeArchiveError(f"no ZIP header at offset {self._header_start}")
            self._need = _LOCAL_HEADER.size
            return
        if self._need == _LOCAL_HEADER.size:
            name_length, extra_length = _LOCAL_HEADER.unpack(header)[9:]
            self._need += name_length + extra_length
            if name_length + extra_length:
                return
        self._start_entry(bytes(header))

    def _start_entry(self, header: bytes) -> None:
        _, _, flags, method, _, _, crc, compressed, size, name_length, _ = _LOCAL_HEADER.unpack_from(header)
        follow_deflate = False
        if flags & _FLAG_DATA_DESCRIPTOR:
            if method != _DEFLATED:
                # A STORED entry's end is unknown: it cannot be followed, keep the rest for finish().
                self._start_spool()
                return
            # A deflate stream ends by itself; CRC and sizes come after it (the header's are zeros).
            follow_deflate = True
            crc = compressed = size = 0
        fixed = _LOCAL_HEADER.size
        raw_name = header[fixed : fixed + name_length]
        name = _decode_name(raw_name, flags)
        if flags & _FLAG_ENCRYPTED:
            raise UnsafeArchiveError(f"encrypted entry: {name!r}")
        if method not in (_STORED, _DEFLATED):
            raise UnsafeArchiveError(f"unsupported compression method {method} for {name!r}")
        extra = header[fixed + name_length :]
        if follow_deflate:
            declared = _Declared(name, method, 0, 0, 0)
            self._entry = self._output.open_entry(self._output.admit(declared), declared, follow_deflate=True)
            self._entry_left = None
            # Java writes a 64-bit descriptor without a ZIP64 extra here once a size passes 4 GiB.
            self._zip64_descriptor = _has_zip64_extra(extra)
        else:
            if _ZIP64_MARK in (compressed, size):
                size, compressed = _zip64_sizes(extra, size, compressed, name)
            declared = _Declared(name, method, crc, compressed, size)
            self._streamed[self._header_start] = declared
            self._entry = self._output.open_entry(self._output.admit(declared), declared)
            self._entry_left = compressed
        self._entry_start = self._header_start
        self._entry_name = name
        self._header.clear()
        self._need = 4
        if compressed == 0 and not follow_deflate:
            self._complete_entry()

    def _expect_descriptor(self) -> None:
        """The entry's deflate stream ended: its data descriptor comes next."""
        writer = self._entry
        assert isinstance(writer, _EntryWriter)
        self._descriptor = self._zip64_descriptor or writer.consumed >= _ZIP64_MARK or writer.written >= _ZIP64_MARK
        self._header.clear()
        self._need = 4

    def _parse_descriptor(self) -> None:
        """Check the data descriptor (optional signature, CRC, sizes) and complete the entry."""
        header = self._header
        fields = 20 if self._descriptor else 12  # CRC and two sizes of 8 or 4 bytes
        if self._need == 4:
            self._need = 4 + fields if bytes(header) == _DESCRIPTOR_SIGNATURE else fields
            return
        crc, compressed, size = struct.unpack("<IQQ" if self._descriptor else "<III", header[-fields:])
        writer = self._entry
        assert isinstance(writer, _EntryWriter)
        if (compressed, size) != (writer.consumed, writer.written):
            raise UnsafeArchiveError(f"data descriptor of {self._entry_name!r} disagrees with its data")
        writer.declare(crc, size, compressed)
        self._streamed[self._entry_start] = _Declared(self._entry_name, _DEFLATED, crc, compressed, size)
        self._descriptor = None
        self._header.clear()
        self._need = 4
        self._complete_entry()

    def _complete_entry(self) -> None:
        assert self._entry is not None
        relpath = self._entry.finish()
        self._entry = None
        if relpath is not None:
            self._announce(relpath)

    def _announce(self, relpath: str) -> None:
        with self._cond:
            self._members.append(relpath)
            self._done.add(relpath)
            self._cond.notify_all()
        if self._on_member is not None:
            self._on_member(relpath)

    def _start_spool(self) -> None:
        # An unnamed temporary file: nothing to clean up if the process dies.
        self._spool = tempfile.TemporaryFile(dir=self._spool_dir, prefix=".xnatfs-spool-")
        self._spool_start = self._header_start
        self._spool.write(self._header)
        self._header.clear()

    # -- end of stream -------------------------------------------------------------------------------------

    def _finish_from_spool(self) -> None:
        assert self._spool is not None
        spool = _SpoolView(self._spool, self._spool_start)
        if not _has_end_record(self._spool):
            raise IncompleteDownloadError("the stream ended before the end of the central directory")
        infos, directory_start = _read_directory(spool)
        if len(infos) > self._limits.max_entries:
            raise UnsafeArchiveError(f"more than {self._limits.max_entries} entries")
        # The view gives the stream's own offsets: entries before the spool are the ones streamed.
        streamed = dict(self._streamed)
        spooled = []
        for info in infos:
            _check_entry_type(info)
            if info.header_offset >= self._spool_start:
                spooled.append(info)
                continue
            declared = streamed.pop(info.header_offset, None)
            if declared is None:
                raise UnsafeArchiveError(f"central directory lists an entry not in the stream: {info.filename!r}")
            if declared != _Declared.of(info):
                raise UnsafeArchiveError(f"central directory disagrees with the stream about {info.filename!r}")
        if streamed:
            name = next(iter(streamed.values())).name
            raise UnsafeArchiveError(f"entry missing from the central directory: {name!r}")
        plan = _plan(spooled, spool, self._spool_start, directory_start, self._output)
        for relpath in _extract_planned(spool, plan, self._output):
            if relpath is not None:
                self._announce(relpath)

    # -- state -----------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise ValueError("the stream is already finished")

    def _abort(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()
        self._release()

    def _release(self) -> None:
        """Remove the partial entry, close the spool (which deletes it) and every descriptor."""
        self._entry = None
        self._descriptor = None
        self._output.close()
        if self._spool is not None:
            self._spool.close()


# -- writing entries -------------------------------------------------------------------------------------


class _Output:
    """Writes admitted entries below one root folder, never through or as a symlink."""

    def __init__(self, root: str, limits: ExtractLimits, map_name: MapName | None) -> None:
        self._limits = limits
        self._map_name = map_name
        self._layout = _Layout()
        self._entries = 0
        self._declared_total = 0
        self.written_total = 0  # bytes actually written, all entries
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The last directory opened, kept: XNAT archives put many files in one folder.
        self._cached_dir = ""
        self._cached_fd = self._root_fd
        self._temp_prefix = f".xnatfs-{secrets.token_hex(4)}-"
        self._temp_count = 0
        self._current: _EntryWriter | None = None

    def admit(self, entry: _Declared) -> str | None:
        """Check one entry's name and declared sizes; return where it goes, or None to skip it."""
        name, size, compressed = entry.name, entry.size, entry.compressed
        self._entries += 1
        if self._entries > self._limits.max_entries:
            raise UnsafeArchiveError(f"more than {self._limits.max_entries} entries")
        relpath = check_member_name(name)
        if self._map_name is not None:
            mapped = self._map_name(relpath)
            if mapped is None:
                return None
            relpath = check_member_name(mapped)
        if entry.method == _STORED and size != compressed:
            raise UnsafeArchiveError(f"stored entry with different sizes: {name!r}")
        if size > self._limits.max_entry_size:
            raise UnsafeArchiveError(f"entry larger than {self._limits.max_entry_size} bytes: {name!r}")
        self._declared_total += size
        if self._declared_total > self._limits.max_total_size:
            raise UnsafeArchiveError(f"archive larger than {self._limits.max_total_size} bytes")
        if size > RATIO_GRACE_BYTES and size > self._limits.max_ratio * compressed:
            raise UnsafeArchiveError(f"compression ratio above {self._limits.max_ratio}: {name!r}")
        self._layout.add(relpath, entry.is_dir)
        return relpath

    def open_entry(self, relpath: str | None, entry: _Declared, follow_deflate: bool = False) -> _EntryWriter | _Skip:
        """Return the writer for an admitted entry going to ``relpath`` (a directory is created right away).

        ``follow_deflate``: the entry's sizes are unknown (data descriptor); a skipped one is inflated all
        the same, to find its end.
        """
        if relpath is None:
            return _EntryWriter(self, None, entry, follow_deflate=True) if follow_deflate else _Skip()
        if entry.is_dir:
            self._dir_fd(relpath)
            return _EntryWriter(self, relpath, entry, follow_deflate=follow_deflate)
        parent, _, base = relpath.rpartition("/")
        dir_fd = self._dir_fd(parent)
        # No lstat of the target here (one per member): publish() links without replacing and refuses then.
        while True:
            self._temp_count += 1
            temp_name = f"{self._temp_prefix}{self._temp_count}.part"
            try:
                fd = os.open(temp_name, _CREATE_FILE, 0o644, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue  # an archive member happens to use that name
        writer = _EntryWriter(self, relpath, entry, fd, dir_fd, temp_name, base, follow_deflate)
        self._current = writer
        return writer

    def publish(self, writer: _EntryWriter) -> None:
        """Give a verified file its final name, refusing to replace anything there."""
        assert writer.dir_fd is not None and writer.temp_name is not None
        try:
            os.link(writer.temp_name, writer.final_name, src_dir_fd=writer.dir_fd, dst_dir_fd=writer.dir_fd)
        except FileExistsError:
            raise UnsafeArchiveError(f"target already exists: {writer.relpath!r}") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links on this file system: check, then rename (the folder is private to us).
            if _lexists(writer.final_name, writer.dir_fd):
                raise UnsafeArchiveError(f"target already exists: {writer.relpath!r}") from None
            os.rename(writer.temp_name, writer.final_name, src_dir_fd=writer.dir_fd, dst_dir_fd=writer.dir_fd)
        else:
            os.unlink(writer.temp_name, dir_fd=writer.dir_fd)
        self._current = None

    def close(self) -> None:
        """Remove a partly written file and close every descriptor; idempotent."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        if self._cached_fd != self._root_fd:
            os.close(self._cached_fd)
        if self._root_fd >= 0:
            os.close(self._root_fd)
        self._root_fd = self._cached_fd = -1

    def _dir_fd(self, reldir: str) -> int:
        """Return a descriptor of folder ``reldir``, creating what is missing; refuse symlinks and files."""
        if reldir == self._cached_dir:
            return self._cached_fd
        fd = self._root_fd
        try:
            for part in reldir.split("/") if reldir else ():
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    # O_NOFOLLOW: a symlink planted in the destination is refused, never followed.
                    child = os.open(part, _OPEN_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeArchiveError(f"not a directory (symlink or file): {reldir!r}") from None
                    raise
                if fd != self._root_fd:
                    os.close(fd)
                fd = child
        except BaseException:
            if fd != self._root_fd:
                os.close(fd)
            raise
        if self._cached_fd != self._root_fd:
            os.close(self._cached_fd)
        self._cached_dir, self._cached_fd = reldir, fd
        return fd


class _EntryWriter:
    """One entry's compressed bytes in; inflated, counted, CRC-checked and written out; published by finish().

    A directory entry has no file (``fd`` None): it must not produce a single byte. With ``relpath`` None
    the entry is skipped: inflated and checked, written nowhere. With ``follow_deflate`` its CRC and sizes
    are unknown until :meth:`declare` (data descriptor): it is fed by :meth:`inflate_to_end`.
    """

    def __init__(
        self,
        output: _Output,
        relpath: str | None,
        entry: _Declared,
        fd: int | None = None,
        dir_fd: int | None = None,
        temp_name: str | None = None,
        final_name: str = "",
        follow_deflate: bool = False,
    ) -> None:
        self.relpath = relpath
        self._label = relpath if relpath is not None else entry.name
        self.dir_fd = dir_fd  # borrowed from the output's cache: valid until the next entry is opened
        self.temp_name = temp_name
        self.final_name = final_name
        self._output = output
        self._limits = output._limits
        self._declared_size: int | None = None if follow_deflate else entry.size
        self._declared_crc = entry.crc
        self._compressed_size: int | None = None if follow_deflate else entry.compressed
        self._fd = fd
        self._inflater = zlib.decompressobj(-15) if entry.method == _DEFLATED else None
        self._written = 0
        self._crc = 0
        self.consumed = 0  # compressed bytes read (entries fed by inflate_to_end)
        self.ended = False  # inflate_to_end met the end of the deflate stream
        self._hole_at_end = False  # the last bytes were skipped as a hole: the file must be extended

    @property
    def written(self) -> int:
        return self._written

    def declare(self, crc: int, size: int, compressed: int) -> None:
        """Set the CRC and sizes read from the data descriptor, for finish() to check."""
        self._declared_crc, self._declared_size, self._compressed_size = crc, size, compressed

    def inflate_to_end(self, data: memoryview) -> int:
        """Inflate ``data`` up to the end of the deflate stream; return how many bytes of it were used."""
        inflater = self._inflater
        assert inflater is not None
        total = len(data)
        base = self.consumed
        while True:
            out = inflater.decompress(data, _CHUNK)
            # At the end, what follows the stream is in unused_data (unconsumed_tail may repeat it).
            data = b"" if inflater.eof else inflater.unconsumed_tail
            self.consumed = base + total - len(data) - len(inflater.unused_data)
            if out:
                self._emit(memoryview(out))
            if inflater.eof:
                self.ended = True
                return total - len(inflater.unused_data)
            if not data and len(out) < _CHUNK:
                return total

    def write(self, data: memoryview) -> None:
        if self._inflater is None:
            self._emit(data)
            return
        # Inflate in bounded steps so that a bomb never sits in memory.
        while True:
            out = self._inflater.decompress(data, _CHUNK)
            if out:
                self._emit(memoryview(out))
            data = self._inflater.unconsumed_tail
            if not data and len(out) < _CHUNK:
                break

    def finish(self) -> str:
        """Verify size and CRC, publish the file; return its relative path."""
        if self._inflater is not None and (not self._inflater.eof or (self._inflater.unused_data and not self.ended)):
            raise UnsafeArchiveError(f"corrupt compressed data in {self._label!r}")
        if self._written != self._declared_size:
            raise UnsafeArchiveError(f"size of {self._label!r} differs from the one declared")
        if self._crc != self._declared_crc:
            raise UnsafeArchiveError(f"bad CRC for {self._label!r}")
        assert self._compressed_size is not None
        if self._written > RATIO_GRACE_BYTES and self._written > self._limits.max_ratio * self._compressed_size:
            raise UnsafeArchiveError(f"compression ratio above {self._limits.max_ratio}: {self._label!r}")
        if self._fd is not None:
            if self._hole_at_end:
                os.ftruncate(self._fd, self._written)
            os.close(self._fd)
            self._fd = None
            self._output.publish(self)
        return self.relpath

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.temp_name is not None:
            try:
                os.unlink(self.temp_name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass

    def _emit(self, out: memoryview) -> None:
        count = len(out)
        self._written += count
        self._output.written_total += count
        # Checked before writing, on real output: a lying header cannot make us write more.
        if self._declared_size is not None and self._written > self._declared_size:
            raise UnsafeArchiveError(f"{self._label!r} holds more data than declared")
        if self._written > self._limits.max_entry_size:
            raise UnsafeArchiveError(f"{self._label!r} is larger than {self._limits.max_entry_size} bytes")
        if self._output.written_total > self._limits.max_total_size:
            raise UnsafeArchiveError(f"archive larger than {self._limits.max_total_size} bytes")
        # Against the entry's whole compressed length (all we will ever read of it), so the ratio of a
        # file that starts with a long run of zeros is judged on the complete file, not on its start.
        if self._compressed_size is not None:
            if self._written > RATIO_GRACE_BYTES and self._written > self._limits.max_ratio * self._compressed_size:
                raise UnsafeArchiveError(f"compression ratio above {self._limits.max_ratio}: {self._label!r}")
        elif self._written > STREAMED_RATIO_GRACE_BYTES and self._written > self._limits.max_ratio * self.consumed:
            raise UnsafeArchiveError(f"compression ratio above {self._limits.max_ratio}: {self._label!r}")
        self._crc = zlib.crc32(out, self._crc)
        if self._fd is None:
            if self.relpath is None:
                return  # a skipped entry: checked, written nowhere
            raise UnsafeArchiveError(f"directory entry with data: {self.relpath!r}")
        if _all_zeros(out):
            # A hole instead: zeros cost no disk (long runs in volumes, multi-gigabyte test files).
            os.lseek(self._fd, count, os.SEEK_CUR)
            self._hole_at_end = True
            return
        self._hole_at_end = False
        while out:
            out = out[os.write(self._fd, out) :]


class _Skip:
    """Stands in for an entry that map_name skipped: its bytes are dropped unread."""

    def write(self, data: memoryview) -> None:
        pass

    def finish(self) -> None:
        return None

    def discard(self) -> None:
        pass


class _Layout:
    """The paths an archive creates: refuses duplicates and a file where a directory must be."""

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._dirs: set[str] = set()  # directory entries and every parent of an entry
        self._dir_entries: set[str] = set()

    def add(self, path: str, is_dir: bool) -> None:
        if path in self._files or path in self._dir_entries:
            raise UnsafeArchiveError(f"duplicate entry: {path!r}")
        if not is_dir and path in self._dirs:
            raise UnsafeArchiveError(f"{path!r} is both a file and a directory")
        parents = []
        parent = path
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in self._dirs:
                break  # its own parents are known already
            if parent in self._files:
                raise UnsafeArchiveError(f"{parent!r} is both a file and a directory")
            parents.append(parent)
        self._dirs.update(parents)
        if is_dir:
            self._dirs.add(path)
            self._dir_entries.add(path)
        else:
            self._files.add(path)


# -- archives on disk (and spooled streams) --------------------------------------------------------------


@dataclass
class _Planned:
    info: zipfile.ZipInfo
    relpath: str | None
    data_offset: int


def _read_directory(archive: BinaryIO) -> tuple[list[zipfile.ZipInfo], int]:
    """Return the central directory's entries and where the directory starts.

    Raises UnsafeArchiveError (caused by what zipfile raised) for a corrupt or truncated archive.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.infolist(), zf.start_dir
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError, OverflowError) as exc:
        raise UnsafeArchiveError(f"corrupt or truncated ZIP: {exc}") from exc


def _plan(
    infos: list[zipfile.ZipInfo], archive: BinaryIO, start: int, directory_start: int, output: _Output
) -> list[_Planned]:
    """Check every entry (type, name, sizes, local header, overlap); return them in archive order."""
    plan = []
    spans = []
    for info in infos:
        _check_entry_type(info)
        relpath = output.admit(_Declared.of(info))
        data_offset = _local_data_offset(archive, info)
        spans.append((info.header_offset, data_offset + info.compress_size, info.orig_filename))
        plan.append(_Planned(info, relpath, data_offset))
    # Entries that share bytes are how a small archive expands to terabytes without recursion.
    position, previous = start, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise UnsafeArchiveError(f"overlapping entries: {previous!r} and {name!r}")
        position, previous = end, name
    if position > directory_start:
        raise UnsafeArchiveError(f"entry {previous!r} runs into the central directory")
    plan.sort(key=lambda item: item.info.header_offset)
    return plan


def _local_data_offset(archive: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Return where the entry's data starts; its local header must agree with the central directory."""
    archive.seek(info.header_offset)
    header = archive.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        raise UnsafeArchiveError(f"no local header for {info.orig_filename!r}")
    _, _, _, method, _, _, _, _, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    name = _decode_name(archive.read(name_length), info.flag_bits)
    if name != info.orig_filename or method != info.compress_type:
        raise UnsafeArchiveError(f"local header disagrees with the central directory: {info.orig_filename!r}")
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _extract_planned(archive: BinaryIO, plan: list[_Planned], output: _Output) -> Iterable[str | None]:
    """Write each planned entry; yield its relative path (None if skipped) once it is published."""
    for item in plan:
        info = item.info
        writer = output.open_entry(item.relpath, _Declared.of(info))
        if item.relpath is not None:
            archive.seek(item.data_offset)
            left = info.compress_size
            while left:
                chunk = archive.read(min(left, _CHUNK))
                if not chunk:
                    raise UnsafeArchiveError(f"archive truncated inside {info.orig_filename!r}")
                writer.write(memoryview(chunk))
                left -= len(chunk)
        yield writer.finish()


def _check_entry_type(info: zipfile.ZipInfo) -> None:
    """Refuse encrypted entries, other compression methods, and anything but regular files and folders."""
    name = info.orig_filename
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise UnsafeArchiveError(f"encrypted entry: {name!r}")
    if info.compress_type not in (_STORED, _DEFLATED):
        raise UnsafeArchiveError(f"unsupported compression method {info.compress_type} for {name!r}")
    kind = stat.S_IFMT(info.external_attr >> 16)
    expected = stat.S_IFDIR if name.endswith("/") else stat.S_IFREG
    # Zero: the archive says nothing about the type (DOS/Windows writers, Java's ZipOutputStream).
    if kind and kind != expected:
        raise UnsafeArchiveError(f"entry {name!r} is a {_FILE_TYPES.get(kind, f'file of type {kind:o}')}")


class _SpoolView:
    """The spool file seen at its place in the stream: offset ``start`` is the spool's first byte.

    zipfile then reads the stream's own offsets; the bytes before ``start`` were streamed and read as absent.
    """

    def __init__(self, spool: BinaryIO, start: int) -> None:
        self._spool = spool
        self._start = start
        self._position = start

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence == os.SEEK_END:
            offset += self._start + self._spool.seek(0, os.SEEK_END)
        if offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if self._position < self._start:
            return b""
        self._spool.seek(self._position - self._start)
        data = self._spool.read(-1 if size is None else size)
        self._position += len(data)
        return data


def _has_end_record(spool: BinaryIO) -> bool:
    """Whether a whole end-of-central-directory record is where zipfile will look for one."""
    size = spool.seek(0, os.SEEK_END)
    spool.seek(max(0, size - _END_SEARCH_BYTES))
    tail = spool.read()
    found = tail.rfind(_END_SIGNATURE)
    return found >= 0 and len(tail) - found >= _END_RECORD_SIZE


# -- small helpers ---------------------------------------------------------------------------------------


def _decode_name(raw: bytes, flags: int) -> str:
    """Decode an entry name the way zipfile does (UTF-8 if flagged, else code page 437)."""
    try:
        return raw.decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
    except UnicodeDecodeError:
        raise UnsafeArchiveError(f"entry name is not valid UTF-8: {raw!r}") from None


def _zip64_sizes(extra: bytes, size: int, compressed: int, name: str) -> tuple[int, int]:
    """Return (size, compressed) from a local header's ZIP64 extra field."""
    position = 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + length]
        position += 4 + length
        if field_id != _ZIP64_EXTRA:
            continue
        values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
        try:
            if size == _ZIP64_MARK:
                size = values.pop(0)
            if compressed == _ZIP64_MARK:
                compressed = values.pop(0)
        except IndexError:
            break
        return size, compressed
    raise UnsafeArchiveError(f"ZIP64 sizes missing for {name!r}")


def _all_zeros(data: memoryview) -> bool:
    """Whether ``data`` (at least a page) is all zero bytes; cheap for the usual data, which fails at once."""
    size = len(data)
    if size < _HOLE_MIN or data[0] or data[-1] or data[size // 2]:
        return False
    if any(data[::_HOLE_MIN]):  # one byte a page: a sample, before the exact comparison
        return False
    return data.tobytes() == (_ZEROS[:size] if size <= len(_ZEROS) else bytes(size))


def _has_zip64_extra(extra: bytes) -> bool:
    """Whether a local header's extra fields include a ZIP64 one."""
    position = 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        if field_id == _ZIP64_EXTRA:
            return True
        position += 4 + length
    return False


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _refuse_existing(dest_dir: str) -> None:
    if os.path.lexists(dest_dir):
        raise FileExistsError(errno.EEXIST, "destination already exists", dest_dir)


def _make_staging(dest_dir: str) -> str:
    """Create a private staging folder next to ``dest_dir`` (same file system, so rename is atomic)."""
    parent, base = os.path.split(dest_dir)
    return tempfile.mkdtemp(prefix=f".{base[:100]}.staging-", dir=parent)


def _publish(staging: str, dest_dir: str) -> None:
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
