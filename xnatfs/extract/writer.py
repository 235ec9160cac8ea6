"""Writing entries: inflate, count, CRC-check and write each member below the destination, never through a
symlink and never over an existing file; sparse output for long runs of zeros."""

from __future__ import annotations

import errno
import os
import secrets

from xnatfs.exceptions import UnsafeArchiveError

try:  # ISA-L: zlib's API, with CRC-32 about 5x and inflation about 1.6x faster (the CPU of a cold read)
    from isal import isal_zlib as zlib
except ImportError:  # pragma: no cover - isal is a dependency; plain zlib does the same, slower
    import zlib
from xnatfs.extract.names import check_member_name
from xnatfs.extract.records import _CHUNK, _DEFLATED, _STORED, RATIO_GRACE_BYTES, ExtractLimits, MapName, _Declared

# A DEFLATE entry with a data descriptor has no known length: its ratio is judged on the bytes read so far
# once it has written this much (a legitimate file may start with a long run of zeros), and on the whole
# entry at its end.
STREAMED_RATIO_GRACE_BYTES = 64 << 20

_HOLE_MIN = 4096  # zero runs at least this long, in one piece of output, are written as holes

_ZEROS = bytes(_CHUNK)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
        # No lstat of the target here (one per member): link_into_place() links without replacing and refuses then.
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

    def link_into_place(self, writer: _EntryWriter) -> None:
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
            self._output.link_into_place(self)
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


def _all_zeros(data: memoryview) -> bool:
    """Whether ``data`` (at least a page) is all zero bytes; cheap for the usual data, which fails at once."""
    size = len(data)
    if size < _HOLE_MIN or data[0] or data[-1] or data[size // 2]:
        return False
    if any(data[::_HOLE_MIN]):  # one byte a page: a sample, before the exact comparison
        return False
    return data.tobytes() == (_ZEROS[:size] if size <= len(_ZEROS) else bytes(size))


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
