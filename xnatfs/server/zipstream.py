"""A streaming ZIP writer: produces an archive piece by piece, reading member files from disk as it goes.

Like XNAT's default, members are STORED with the CRC and sizes in the local header (no data descriptor,
flag bit 3 clear), so a reader can unpack the stream without seeking. That needs each file's CRC before
its data: the caller passes `crc_of`, which is expected to cache. With a compression level > 0 members
are deflated and, since their compressed size is only known afterwards, followed by a data descriptor.
ZIP64 is written as XNAT's writer (Java's ZipOutputStream) writes it: a STORED member of 4 GiB or more has
a ZIP64 extra field in its local header; a deflated member whose sizes pass 4 GiB gets a data descriptor
with 64-bit sizes although its local header has no ZIP64 extra field; the central directory carries ZIP64
extra fields for what overflows, and a ZIP64 end record follows from 65,535 members or 4 GiB of offsets on.
Names are UTF-8 (flag bit 11). Memory use is one read buffer plus ~100 bytes per member for the central
directory.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .archive import READ_CHUNK
from .model import FileEntry

LOCAL_HEADER = 0x04034B50
CENTRAL_HEADER = 0x02014B50
DATA_DESCRIPTOR = 0x08074B50
END_OF_CENTRAL_DIR = 0x06054B50
ZIP64_END_OF_CENTRAL_DIR = 0x06064B50
ZIP64_LOCATOR = 0x07064B50
ZIP64_EXTRA = 0x0001
LIMIT_32 = 0xFFFFFFFF
LIMIT_16 = 0xFFFF
FLAG_DATA_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
STORED = 0
DEFLATED = 8
UNIX_FILE_MODE = 0o100644 << 16
MADE_BY_UNIX = 3 << 8
OUTPUT_CHUNK = 256 * 1024


@dataclass
class ZipMember:
    """A file to put into the archive under `name` (a "/"-separated path)."""

    name: str
    entry: FileEntry


@dataclass
class _Written:
    """What the central directory needs to know about a member already written."""

    name: bytes
    method: int
    flags: int
    dos_time: int
    dos_date: int
    crc: int
    compressed: int
    size: int
    offset: int


def dos_datetime(mtime: float) -> tuple[int, int]:
    """Return (time, date) in MS-DOS format for a POSIX time (clamped to 1980, the format's start)."""
    t = time.localtime(mtime)
    if t.tm_year < 1980:
        return 0, (1 << 5) | 1
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((t.tm_year - 1980) << 9) | (
        t.tm_mon << 5
    ) | t.tm_mday


def stream_zip(members: Iterable[ZipMember], crc_of: Callable[[FileEntry], int], level: int = 0) -> Iterator[bytes]:
    """Yield the bytes of a ZIP archive of `members` (level 0: STORED, 1-9: deflate at that level).

    Raises EOFError if a file shrinks while it is being sent (the archive would be corrupt).
    """
    return _coalesce(_pieces(members, crc_of, level))


def _pieces(members: Iterable[ZipMember], crc_of: Callable[[FileEntry], int], level: int) -> Iterator[bytes]:
    offset = 0
    written: list[_Written] = []
    for member in members:
        entry = member.entry
        name = member.name.encode("utf-8")
        dos_time, dos_date = dos_datetime(entry.mtime)
        if level > 0:
            record = _Written(name, DEFLATED, FLAG_UTF8 | FLAG_DATA_DESCRIPTOR, dos_time, dos_date, 0, 0, 0, offset)
            header = _local_header(record, zip64=False)
            yield header
            crc, compressed = 0, 0
            compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
            for chunk in _read(entry):
                crc = zlib.crc32(chunk, crc)
                if out := compressor.compress(chunk):
                    compressed += len(out)
                    yield out
            out = compressor.flush()
            compressed += len(out)
            yield out
            record.crc, record.compressed, record.size = crc, compressed, entry.size
            # Java: 64-bit sizes once either passes 4 GiB, whatever the local header said.
            wide = compressed >= LIMIT_32 or entry.size >= LIMIT_32
            descriptor = struct.pack("<IIQQ" if wide else "<IIII", DATA_DESCRIPTOR, crc, compressed, entry.size)
            yield descriptor
            offset += len(header) + compressed + len(descriptor)
        else:
            crc = crc_of(entry)
            record = _Written(name, STORED, FLAG_UTF8, dos_time, dos_date, crc, entry.size, entry.size, offset)
            header = _local_header(record, zip64=entry.size >= LIMIT_32)
            yield header
            yield from _read(entry)
            offset += len(header) + entry.size
        written.append(record)
    yield from _central_directory(written, offset)


def _read(entry: FileEntry) -> Iterator[bytes]:
    """Yield exactly entry.size bytes of the file in chunks."""
    remaining = entry.size
    with open(entry.abspath, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(min(READ_CHUNK, remaining))
            if not chunk:
                raise EOFError(f"{entry.abspath} shrank while being zipped")
            remaining -= len(chunk)
            yield chunk


def _local_header(record: _Written, zip64: bool) -> bytes:
    extra = struct.pack("<HHQQ", ZIP64_EXTRA, 16, record.size, record.compressed) if zip64 else b""
    size32 = LIMIT_32 if zip64 else record.size
    compressed32 = LIMIT_32 if zip64 else record.compressed
    version = 45 if zip64 else 20
    fixed = struct.pack("<IH", LOCAL_HEADER, version) + _entry_fields(record, compressed32, size32)
    return fixed + struct.pack("<HH", len(record.name), len(extra)) + record.name + extra


def _entry_fields(record: _Written, compressed: int, size: int) -> bytes:
    """The fields local and central headers share: flags, method, time, date, CRC, both sizes."""
    return struct.pack(
        "<HHHHIII", record.flags, record.method, record.dos_time, record.dos_date, record.crc, compressed, size
    )


def _central_directory(written: list[_Written], start: int) -> Iterator[bytes]:
    size = 0
    for record in written:
        # ZIP64 extra: only the fields that overflow, in this fixed order.
        values = [v for v in (record.size, record.compressed, record.offset) if v >= LIMIT_32]
        extra = struct.pack(f"<HH{len(values)}Q", ZIP64_EXTRA, 8 * len(values), *values) if values else b""
        version = 45 if values else 20
        fixed = (
            struct.pack("<IHH", CENTRAL_HEADER, MADE_BY_UNIX | version, version)
            + _entry_fields(record, min(record.compressed, LIMIT_32), min(record.size, LIMIT_32))
            + struct.pack(
                "<HHHHHII", len(record.name), len(extra), 0, 0, 0, UNIX_FILE_MODE, min(record.offset, LIMIT_32)
            )
        )
        piece = fixed + record.name + extra
        size += len(piece)
        yield piece
    count = len(written)
    if count >= LIMIT_16 or size >= LIMIT_32 or start >= LIMIT_32:
        zip64_end = start + size
        yield struct.pack("<IQHHIIQQQQ", ZIP64_END_OF_CENTRAL_DIR, 44, 45, 45, 0, 0, count, count, size, start)
        yield struct.pack("<IIQI", ZIP64_LOCATOR, 0, zip64_end, 1)
    yield struct.pack(
        "<IHHHHIIH",
        END_OF_CENTRAL_DIR,
        0,
        0,
        min(count, LIMIT_16),
        min(count, LIMIT_16),
        min(size, LIMIT_32),
        min(start, LIMIT_32),
        0,
    )


def _coalesce(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Join small pieces (headers, small files) into chunks of about OUTPUT_CHUNK; pass big ones through."""
    buffer = bytearray()
    for piece in pieces:
        if len(piece) >= OUTPUT_CHUNK and not buffer:
            yield piece
            continue
        buffer += piece
        if len(buffer) >= OUTPUT_CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
