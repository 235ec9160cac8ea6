"""How much of a file's page cache the kernel holds in large folios (more than one 4 KiB page).

The figure explains the warm-read rows of the benchmark: copying a cached file to a reader costs per
folio, and ext4 keeps a file written in large chunks (as the cache files are) in folios of up to 2 MB,
while the FUSE page cache of Linux up to 6.18 has 4 KiB folios only (large folios for FUSE are not in
6.18's fs/fuse/file.c). Reading the page frame numbers needs root (/proc/self/pagemap, /proc/kpageflags).

Usage: python scripts/bench/folios.py FILE... (prints the share of each file's pages in large folios)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys

PAGE = mmap.PAGESIZE
_KPF_COMPOUND_HEAD = 1 << 15
_KPF_COMPOUND_TAIL = 1 << 16
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


def large_folio_share(path: str) -> float | None:
    """Return the share (0 to 1) of the pages of ``path`` that sit in large folios of the page cache.

    Maps the file, touches each page (which reads what is not cached yet) and looks each page up in
    /proc/kpageflags. Returns None when the page frames cannot be read (not root, no /proc/kpageflags).
    """
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    # A private writable mapping (never written: its pages stay the page cache's) lets ctypes take its address.
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as mapped,
    ):
        pages = (size + PAGE - 1) // PAGE
        for index in range(pages):
            mapped[index * PAGE]  # maps the page
        anchor = ctypes.c_char.from_buffer(mapped)
        start = ctypes.addressof(anchor)
        try:
            with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpageflags:
                pagemap.seek(start // PAGE * 8)
                entries = struct.unpack(f"{pages}Q", pagemap.read(8 * pages))
                large = present = 0
                for entry in entries:
                    pfn = entry & _PFN_MASK
                    if not entry & _PRESENT or not pfn:
                        continue  # not mapped, or page frames hidden (not root)
                    present += 1
                    kpageflags.seek(pfn * 8)
                    (flags,) = struct.unpack("Q", kpageflags.read(8))
                    large += bool(flags & (_KPF_COMPOUND_HEAD | _KPF_COMPOUND_TAIL))
        except OSError:
            return None
        finally:
            del anchor  # the mapping cannot close while ctypes holds a view of it
        return large / present if present else None


if __name__ == "__main__":
    for name in sys.argv[1:]:
        share = large_folio_share(name)
        print(f"{name}: {'unknown (needs root)' if share is None else f'{100 * share:.0f} % in large folios'}")
