"""Builds ZIP archives byte by byte for tests, hostile ones included (zipfile refuses to write most of them).

:func:`build` takes :class:`Entry` objects; each field of an entry can lie (name, CRC, sizes, type), an
entry can be left out of the central directory and the central directory can point anywhere. The
functions at the end build the classic attacks.
"""

from __future__ import annotations

import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

STORED, DEFLATED, BZIP2 = 0, 8, 12
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")
_DESCRIPTOR = struct.Struct("<4sIII")
_UNIX = 3  # "version made by" host: Unix, so external_attr carries st_mode


@dataclass
class Entry:
    """One archive entry; every field after ``data`` lets it lie or misbehave."""

    name: str | bytes
    data: bytes = b""
    method: int = STORED
    mode: int | None = None  # st_mode put in external_attr, e.g. stat.S_IFLNK | 0o777
    crc: int | None = None  # declared CRC (default: the real one)
    size: int | None = None  # declared uncompressed size (default: the real one)
    descriptor: bool = False  # CRC and sizes after the data (flag bit 3), zeros in the local header
    descriptor_signature: bool = True  # the descriptor starts with PK\x07\x08 (optional in the format)
    flags: int = 0
    listed: bool = True  # in the central directory
    # Central directory fields that differ from the local header: name, crc, size, compressed, offset.
    central: dict = field(default_factory=dict)


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _raw_name(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8")


def build(entries: list[Entry], extra_central: list[tuple[Entry, int]] = (), comment: bytes = b"") -> bytes:
    """Return the archive; ``extra_central`` adds directory records (entry, local header offset)."""
    out = bytearray()
    records = []
    for entry in entries:
        offset = len(out)
        out += local_entry(entry)
        if entry.listed:
            records.append((entry, entry.central.get("offset", offset)))
    records += list(extra_central)
    return bytes(out + central_directory(records, len(out), comment))


def local_entry(entry: Entry) -> bytes:
    """The local header, data and (if asked) data descriptor of one entry."""
    payload = deflate(entry.data) if entry.method == DEFLATED else entry.data
    crc = zlib.crc32(entry.data) if entry.crc is None else entry.crc
    size = len(entry.data) if entry.size is None else entry.size
    flags = entry.flags | FLAG_UTF8 | (FLAG_DESCRIPTOR if entry.descriptor else 0)
    name = _raw_name(entry.name)
    declared = (0, 0, 0) if entry.descriptor else (crc, len(payload), size)
    header = _LOCAL.pack(b"PK\x03\x04", 20, flags, entry.method, 0, 0x21, *declared, len(name), 0)
    trailer = _DESCRIPTOR.pack(b"PK\x07\x08", crc, len(payload), size) if entry.descriptor else b""
    if not entry.descriptor_signature:
        trailer = trailer[4:]
    return header + name + payload + trailer


def central_directory(records: list[tuple[Entry, int]], start: int, comment: bytes = b"") -> bytes:
    """Central directory records for (entry, local header offset) pairs, then the end record."""
    out = bytearray()
    for entry, offset in records:
        payload_size = entry.central.get("compressed") or (
            len(deflate(entry.data)) if entry.method == DEFLATED else len(entry.data)
        )
        crc = zlib.crc32(entry.data) if entry.crc is None else entry.crc
        size = len(entry.data) if entry.size is None else entry.size
        name = _raw_name(entry.central.get("name", entry.name))
        made_by = 20 if entry.mode is None else (_UNIX << 8) | 20
        flags = entry.flags | FLAG_UTF8 | (FLAG_DESCRIPTOR if entry.descriptor else 0)
        attributes = (entry.mode or 0) << 16
        out += _CENTRAL.pack(
            b"PK\x01\x02",
            made_by,
            20,
            flags,
            entry.method,
            0,
            0x21,
            entry.central.get("crc", crc),
            payload_size,
            entry.central.get("size", size),
            len(name),
            0,
            0,
            0,
            0,
            attributes,
            offset,
        )
        out += name
    count = len(records)
    end = _END.pack(b"PK\x05\x06", 0, 0, count, count, len(out), start, len(comment))
    return bytes(out + end + comment)


# -- the classic attacks ---------------------------------------------------------------------------------


def single(name: str | bytes, data: bytes = b"evil", **fields) -> bytes:
    """An archive of one harmless entry and one ``name`` (the hostile one)."""
    return build([Entry("ok.txt", b"fine"), Entry(name, data, **fields)])


def symlink(target: str = "/etc/passwd") -> bytes:
    return single("link", target.encode(), mode=stat.S_IFLNK | 0o777)


def device() -> bytes:
    return single("null", b"", mode=stat.S_IFCHR | 0o666)


def fifo() -> bytes:
    return single("pipe", b"", mode=stat.S_IFIFO | 0o644)


def bomb(size: int = 32 << 20, declared: int | None = None) -> bytes:
    """Zeros deflated about 1000:1; ``declared`` lies about the size in both headers."""
    return build([Entry("bomb.bin", bytes(size), method=DEFLATED, size=declared)])


def duplicates(first: str = "a/x", second: str = "a/x") -> bytes:
    return build([Entry(first, b"one"), Entry(second, b"two")])


def overlapping(copies: int = 3) -> bytes:
    """One local entry listed ``copies`` times under other names: the non-recursive zip bomb."""
    shared = Entry("f0", b"Z" * 1000)
    body = local_entry(shared)
    records = [(Entry(f"f{i}", shared.data), 0) for i in range(copies)]
    return body + central_directory(records, len(body))


def quoted_overlap() -> bytes:
    """Entry A's data is entry B (header and data): B's bytes are counted twice."""
    inner = local_entry(Entry("b", b"B" * 500))
    outer = Entry("a", inner)
    body = local_entry(outer)
    inner_offset = len(body) - len(inner)
    return body + central_directory([(outer, 0), (Entry("b", b"B" * 500), inner_offset)], len(body))


def bad_crc() -> bytes:
    return build([Entry("ok.txt", b"fine"), Entry("bad.bin", b"x" * 4096, crc=zlib.crc32(b"x" * 4096) ^ 1)])


def descriptor_entries(files: dict[str, bytes], method: int = DEFLATED) -> bytes:
    """Entries whose sizes and CRC come after their data (the stream cannot be followed)."""
    return build([Entry(name, data, method=method, descriptor=True) for name, data in files.items()])


def stored_chunks(files: int, file_size: int, chunk: int = 256 << 10) -> Iterator[bytes]:
    """Yield a STORED archive of ``files`` files of ``file_size`` bytes each, in pieces of ``chunk`` bytes.

    Never holds more than a chunk: for memory tests and benchmarks of multi-gigabyte streams.
    """
    block = bytes(range(256)) * (chunk // 256)
    pieces = [block[: min(chunk, file_size - start)] for start in range(0, file_size, chunk)]
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    records = []
    offset = 0
    for index in range(files):
        name = f"e/scans/1-T1/resources/DICOM/files/{index:06d}.dcm".encode()
        header = _LOCAL.pack(b"PK\x03\x04", 20, FLAG_UTF8, STORED, 0, 0x21, crc, file_size, file_size, len(name), 0)
        yield header + name
        yield from pieces
        records.append((Entry(name, crc=crc, size=file_size, central={"compressed": file_size}), offset))
        offset += len(header) + len(name) + file_size
    yield central_directory(records, offset)
