"""Answering READDIRPLUS with each entry's attributes, so that the kernel needs no LOOKUP per entry.

A kernel that lists a folder of a fresh mount asks for READDIRPLUS (libfuse 3 turns it on by default): the
answer may carry every entry's attributes, and the kernel then knows each name, inode and size at once, for
the mount's TTL. mfusepy's ``readdir`` fills in only the names (its ``_readdir`` passes a mode and an inode
number, never FUSE_FILL_DIR_PLUS), so the kernel sends one LOOKUP round trip per entry before the first
``stat`` or ``open`` of each: 399 of them before ``cat`` reads a 399-file series, each a wake-up of a
daemon thread and a Python call. :func:`readdir_plus_method` answers with the attributes instead.

Only the first listing of a folder within the mount's TTL carries attributes: the kernel keeps them (and
the entries) for the TTL, so listing the folder again (``find`` twice, ``ls`` in a loop) answers with the
names alone, as cheaply as before, and the first listing after the TTL refreshes them.

An entry goes out with its attributes only when the file system gives them all (``st_size`` among them):
a file whose size is not known yet (a PACS instance not retrieved) goes out with its name alone, and the
kernel looks it up as before (the mount then learns its true size first). ``.`` and ``..`` never carry any.

Entries are handed to libfuse with offsets (1, 2, ...): libfuse before 3.17 drops the attributes of entries
filled with offset 0 (its "whole folder at once" mode; fixed by libfuse commit dd95d13). With offsets, each
READDIRPLUS request (the kernel asks for about 32 KiB of entries at a time) fills in from where the last one
stopped; the entries of a listing not yet handed out completely are kept meanwhile, so a big folder is
built once, not once per request.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

FUSE_READDIR_PLUS = 1 << 0  # enum fuse_readdir_flags: the kernel asked for READDIRPLUS
FUSE_FILL_DIR_PLUS = 1 << 1  # enum fuse_fill_dir_flags: this entry's attributes are complete
MAX_PENDING = 64  # listings handed out in part (a reader that stopped early leaves one behind)
MAX_TOLD = 100_000  # folders whose entries' attributes the kernel was told (forgotten all at once beyond)


def readdir_plus_method(mfusepy: Any, base: type) -> Callable[..., int] | None:
    """Return a ``readdir_fuse_3`` for a subclass of mfusepy's FUSE class ``base`` that answers READDIRPLUS
    with attributes, or None when ``base`` or mfusepy lack what it needs (another mfusepy: the kernel then
    looks entries up one by one, as before).

    The method calls the operations' ``readdir(path, fh)``, which returns ``(name, attrs, 0)`` tuples, and
    reads their ``ttl`` (seconds the kernel keeps what it is told).
    """
    plain = getattr(base, "readdir_fuse_3", None)
    c_stat = getattr(mfusepy, "c_stat", None)
    set_st_attrs = getattr(mfusepy, "set_st_attrs", None)
    if not callable(plain) or c_stat is None or not callable(set_st_attrs):
        return None
    size = ctypes.sizeof(c_stat)
    pending: OrderedDict[str, list[tuple[str, dict[str, int], int]]] = OrderedDict()
    told: dict[str, float] = {}  # folder -> when a listing with attributes was handed out whole
    lock = threading.Lock()

    def readdir_fuse_3(self: Any, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        if not flags & FUSE_READDIR_PLUS or path is None:
            return plain(self, path, buf, filler, offset, fip, flags)
        folder = path.decode(self.encoding, self.errors)
        now = time.monotonic()
        with lock:
            entries = pending.pop(folder, None) if offset else None
            fresh = now - told.get(folder, -math.inf) < getattr(self.operations, "ttl", 0)
        if not offset and fresh:  # the kernel still holds every entry's attributes: names will do
            return plain(self, path, buf, filler, offset, fip, flags)
        if entries is None:  # a new listing (offset 0), or one whose rest was dropped
            entries = self.operations.readdir(folder, fip.contents.fh)
        st = c_stat()  # libfuse copies it per entry: one will do
        for index in range(offset, len(entries)):
            name, attrs, _ = entries[index]
            ctypes.memset(ctypes.byref(st), 0, size)
            if "st_size" in attrs and name not in (".", ".."):
                set_st_attrs(st, attrs, use_ns=self.use_ns)
                plus = FUSE_FILL_DIR_PLUS
            else:
                st.st_mode, st.st_ino, plus = attrs["st_mode"], attrs.get("st_ino", 0), 0
            # Entry ``index`` has offset index + 1: the next request, from the offset of the last entry
            # that fitted, starts at the first that did not.
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, plus) != 0:
                with lock:
                    pending[folder] = entries
                    while len(pending) > MAX_PENDING:
                        pending.popitem(last=False)
                break
        else:
            with lock:
                if len(told) >= MAX_TOLD:
                    told.clear()
                told[folder] = now
        return 0

    return readdir_fuse_3
