"""Answering a FUSE read with a file descriptor instead of bytes (libfuse's ``read_buf``).

A ``read`` callback hands libfuse the bytes: Python reads them (one copy into a bytes object, with
the GIL held), mfusepy copies them into libfuse's buffer, and libfuse writes them to the kernel.
A ``read_buf`` callback instead returns a ``struct fuse_bufvec`` that names a file descriptor and
an offset: libfuse reads from it itself after the callback has returned, in C and without the
GIL, and with ``FUSE_CAP_SPLICE_WRITE`` moves the pages to the kernel with splice(2) (no copy
through user space at all). Short reads at the end of a file are libfuse's to handle.

libfuse frees the ``fuse_bufvec`` with ``free()``, so it is allocated here with the C library's
``calloc``. The descriptor must stay open until libfuse has read from it, that is until after the
callback returns: the caller keeps its file object referenced (see ``Operations.read_buf``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_CAP_SPLICE_WRITE = 1 << 7
# Bytes allocated per fuse_bufvec: its 64 bytes on 64-bit Linux (libfuse 3.0 to 3.16), with room to
# spare for fields later libfuse versions append to struct fuse_buf (they stay zero).
_ALLOCATED = 256


class _FuseBuf(ctypes.Structure):
    """``struct fuse_buf`` of fuse_common.h."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),  # off_t: 64-bit with _FILE_OFFSET_BITS=64, as libfuse 3 is built
    ]


class _FuseBufvec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one buffer (``buf[1]`` is an array inside the struct)."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _FuseBuf),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_calloc = _libc.calloc
_calloc.restype = ctypes.c_void_p
_calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_VOID_PP = ctypes.POINTER(ctypes.c_void_p)


def answer_from_fd(bufpp: Any, fd: int, size: int, offset: int) -> None:
    """Make ``*bufpp`` a fuse_bufvec that reads ``size`` bytes of ``fd`` at ``offset``.

    ``bufpp`` is the ``struct fuse_bufvec **`` of libfuse's read_buf callback. Raises MemoryError
    when the C library cannot allocate the few bytes it needs.
    """
    address = _calloc(1, _ALLOCATED)
    if not address:
        raise MemoryError("calloc failed")
    vec = _FuseBufvec.from_address(address)
    vec.count = 1
    buf = vec.buf
    buf.size = size
    buf.flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK
    buf.fd = fd
    buf.pos = offset
    ctypes.cast(bufpp, _VOID_PP)[0] = address
