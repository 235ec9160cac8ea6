"""Reads through the mount at any offset and size: the daemon answers them with a descriptor of the
cache file (libfuse's read_buf, spliced to the kernel), so every byte, the end of a file included,
must still come out right, also when the kernel's page cache is bypassed."""

from __future__ import annotations

import hashlib
import mmap
import os

from mounting import mounted


def test_reads_at_any_offset_and_size_return_the_right_bytes(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        folder = next(f for f, _d, names in sorted(os.walk(mnt)) if f.endswith("/files") and "/scans/" in f and names)
        name = sorted(os.listdir(folder))[0]
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            whole = f.read()
        size = os.stat(path).st_size
        assert len(whole) == size > 8192
        (cached,) = [os.path.join(r, n) for r, _d, names in os.walk(cache_dir) for n in names if n == name]
        with open(cached, "rb") as f:
            assert hashlib.md5(whole).digest() == hashlib.md5(f.read()).digest()
        # O_DIRECT skips the kernel's page cache: each read reaches the daemon with exactly this
        # offset and size, also past the end of the file (a short answer) and at the end (nothing).
        spans = [(0, 1), (1, 4095), (4095, 8193), (size // 3, 65537), (size - 1, 4096), (size - 100, 1 << 20)]
        spans += [(size, 10), (size + 4096, 10), (0, size + 12345)]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for offset, length in spans:
                assert os.pread(fd, length, offset) == whole[offset : offset + length], (offset, length)
        finally:
            os.close(fd)
        # The same through the page cache, freshly dropped, and through mmap.
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            for offset, length in spans:
                assert os.pread(f.fileno(), length, offset) == whole[offset : offset + length], (offset, length)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                assert view[size - 5000 :] == whole[size - 5000 :]
