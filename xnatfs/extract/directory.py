"""Archives on disk (and spooled streams): the central directory read, checked and planned before anything
is written, then each planned entry extracted."""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from xnatfs.exceptions import UnsafeArchiveError
from xnatfs.extract.records import _CHUNK, _LOCAL_HEADER, _LOCAL_SIGNATURE, _check_entry_type, _Declared, _decode_name
from xnatfs.extract.writer import _Output

_END_SIGNATURE = b"PK\x05\x06"

_END_RECORD_SIZE = 22

_END_SEARCH_BYTES = _END_RECORD_SIZE + 65535  # an end record and the longest comment


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
