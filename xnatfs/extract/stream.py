"""The stream parser: a ZIP fed as its bytes arrive, each member written out as soon as it is complete."""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from xnatfs.exceptions import IncompleteDownloadError, UnsafeArchiveError
from xnatfs.extract.directory import _extract_planned, _has_end_record, _plan, _read_directory, _SpoolView
from xnatfs.extract.names import check_member_name
from xnatfs.extract.records import (
    _DEFLATED,
    _DESCRIPTOR_SIGNATURE,
    _DIRECTORY_SIGNATURES,
    _FLAG_DATA_DESCRIPTOR,
    _FLAG_ENCRYPTED,
    _LOCAL_HEADER,
    _LOCAL_SIGNATURE,
    _STORED,
    _ZIP64_MARK,
    ExtractLimits,
    MapName,
    _check_entry_type,
    _Declared,
    _decode_name,
    _has_zip64_extra,
    _zip64_sizes,
)
from xnatfs.extract.writer import _EntryWriter, _Output, _Skip


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
