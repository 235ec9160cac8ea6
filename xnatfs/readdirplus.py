"""Answering READDIRPLUS with each entry's attributes, so that the kernel needs no LOOKUP per entry.

A kernel that lists a folder of a fresh mount asks for READDIRPLUS (libfuse 3 turns it on by default): the
answer may carry every entry's attributes, and the kernel then knows each name, inode and size at once, for
the mount's TTL. mfusepy's ``readdir`` fills in only the names (its ``_readdir`` passes a mode and an inode
number, never FUSE_FILL_DIR_PLUS), so the kernel sends one LOOKUP round trip per entry before the first
``stat`` or ``open`` of each: 399 of them before ``cat`` reads a 399-file series, each a wake-up of a
daemon thread and a Python call. :func:`readdir_plus_methods` answers with the attributes instead.

Only the first listing of a folder within the mount's TTL carries attributes: the kernel keeps them (and
the entries) for the TTL, so listing the folder again (``find`` twice, ``ls`` in a loop) answers with the
names alone, as cheaply as before, and the first listing after the TTL refreshes them.

An entry goes out with its attributes only when the file system gives them all (``st_size`` among them):
a file whose size is not known yet (a PACS instance not retrieved) goes out with its name alone, and the
kernel looks it up as before (the mount then learns its true size first). ``.`` and ``..`` never carry any.

Entries are handed to libfuse with offsets (1, 2, ...): libfuse before 3.17 drops the attributes of entries
filled with offset 0 (its "whole folder at once" mode; fixed by libfuse commit dd95d13). With offsets, each
request (the kernel asks for about 32 KiB of entries at a time) fills in from where the last one stopped.
The listing a directory handle started is kept under that handle (``opendir`` gives each its own) and every
later request of the handle is answered from it, READDIRPLUS or not (the kernel asks plain READDIR after
the first request): one directory read is one snapshot, built once, as with libfuse's own buffering.
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


def readdir_plus_methods(mfusepy: Any, base: type) -> dict[str, Callable[..., int]] | None:
    """Return ``readdir_fuse_3`` and ``releasedir`` for a subclass of mfusepy's FUSE class ``base`` that
    answer READDIRPLUS with attributes, or None when ``base`` or mfusepy lack what they need (another
    mfusepy: the kernel then looks entries up one by one, as before).

    They call the operations' ``readdir(path, fh)``, which returns ``(name, attrs, 0)`` tuples, and read
    their ``ttl`` (seconds the kernel keeps what it is told); the operations' ``opendir`` must give each
    directory handle its own number.
    """
    plain = getattr(base, "readdir_fuse_3", None)
    plain_releasedir = getattr(base, "releasedir", None)
    c_stat = getattr(mfusepy, "c_stat", None)
    set_st_attrs = getattr(mfusepy, "set_st_attrs", None)
    if not callable(plain) or not callable(plain_releasedir) or c_stat is None or not callable(set_st_attrs):
        return None
    size = ctypes.sizeof(c_stat)
    pending: OrderedDict[int, list[tuple[str, dict[str, int], int]]] = OrderedDict()  # per directory handle
    told: dict[str, float] = {}  # folder -> when a listing with attributes was handed out whole
    lock = threading.Lock()

    def readdir_fuse_3(self: Any, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        if path is None or not fip:
            return plain(self, path, buf, filler, offset, fip, flags)
        folder = path.decode(self.encoding, self.errors)
        handle = fip.contents.fh
        plus = bool(flags & FUSE_READDIR_PLUS)
        now = time.monotonic()
        with lock:
            kept = pending.get(handle) if offset else None
            fresh = now - told.get(folder, -math.inf) < getattr(self.operations, "ttl", 0)
        if kept is None and not offset and (not plus or fresh):
            # Names will do (the kernel still holds every entry's attributes, or asked for none): libfuse
            # keeps this listing whole for the handle and answers its later requests itself.
            return plain(self, path, buf, filler, offset, fip, flags)
        # A new listing (offset 0), or (rarely) one whose handle's list was dropped: listed again.
        entries = kept if kept is not None else self.operations.readdir(folder, fip.contents.fh)
        st = c_stat()  # libfuse copies it per entry: one will do
        complete = True
        for index in range(offset, len(entries)):
            name, attrs, _ = entries[index]
            ctypes.memset(ctypes.byref(st), 0, size)
            if plus and "st_size" in attrs and name not in (".", ".."):
                set_st_attrs(st, attrs, use_ns=self.use_ns)
                fill_plus = FUSE_FILL_DIR_PLUS
            else:
                st.st_mode, st.st_ino, fill_plus = attrs["st_mode"], attrs.get("st_ino", 0), 0
            # Entry ``index`` has offset index + 1: the next request, from the offset of the last entry
            # that fitted, starts at the first that did not.
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, fill_plus) != 0:
                complete = False
                break
        with lock:
            pending[handle] = entries  # for the handle's next request, until releasedir
            pending.move_to_end(handle)
            while len(pending) > MAX_PENDING:
                pending.popitem(last=False)
            if plus and complete:
                if len(told) >= MAX_TOLD:
                    told.clear()
                told[folder] = now
        return 0

    def releasedir(self: Any, path: bytes | None, fip: Any) -> int:
        if fip:
            with lock:
                pending.pop(fip.contents.fh, None)
        return plain_releasedir(self, path, fip)

    return {"readdir_fuse_3": readdir_fuse_3, "releasedir": releasedir}
