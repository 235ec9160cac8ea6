"""The ZIP format as read here: record layouts, flags, what an entry declares, limits, small decoders."""

from __future__ import annotations

import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from xnatfs.exceptions import UnsafeArchiveError

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

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")

_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"

_ZIP64_EXTRA = 0x0001

_ZIP64_MARK = 0xFFFFFFFF

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


def _has_zip64_extra(extra: bytes) -> bool:
    """Whether a local header's extra fields include a ZIP64 one."""
    position = 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        if field_id == _ZIP64_EXTRA:
            return True
        position += 4 + length
    return False


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
