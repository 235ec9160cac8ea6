"""Reading an HTTP response body straight from its socket into one buffer, used again and again.

Each piece of the body is one ``readinto1`` of the socket's buffered reader (as much as has arrived, up
to the buffer's size, never past the current chunk) into the reader's buffer: no copy through urllib3's
and http.client's buffers, no waiting for a full buffer before handing bytes on, and no allocation (and
zero-filling) of a fresh buffer per piece. A piece is handed on as a memoryview of that buffer, valid
until the consumer asks for the next one. The chunked framing stays http.client's.

Receiving in a thread of its own, ahead of the consumer, was tried and dropped: on two cores shared with
the server, the mount's FUSE threads and the reader of the files, the second thread added CPU (a handoff
and a GIL switch per piece) and took no time off a cold read.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from typing import Any

CHUNK_SIZE = 1 << 20  # at most this many body bytes per piece: one socket read


class BodyReader:
    """Iterates over a response body, piece by piece (memoryviews of one buffer).

    Each piece is valid until the next one is asked for (the buffer is then filled again). Raises what
    the socket layer raises (OSError, TimeoutError, http.client.IncompleteRead, ValueError) from the
    iteration. A body read to its end gives its connection back to the pool.
    """

    def __init__(self, read_into: Callable[[memoryview], int], on_end: Callable[[], None]) -> None:
        self._read_into = read_into
        self._on_end = on_end
        self._buffer = memoryview(bytearray(CHUNK_SIZE))
        self._ended = False

    def __iter__(self) -> Iterator[memoryview]:
        return self

    def __next__(self) -> memoryview:
        if self._ended:
            raise StopIteration
        got = self._read_into(self._buffer)
        if not got:
            self._ended = True
            self._on_end()
            raise StopIteration
        return self._buffer[:got]


def direct_body(response: Any) -> BodyReader | None:
    """Return a :class:`BodyReader` of a ``requests`` response's body, or None where it does not apply.

    It applies to bodies without Content-Encoding read through http.client (length known, chunked, or up to
    the end of the connection). Reads go straight into the reader's buffer: no copy through urllib3's and
    http.client's buffers, no waiting for a full buffer before handing bytes on.
    """
    raw = response.raw
    message = getattr(raw, "_fp", None)
    fp = getattr(message, "fp", None)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if (
        not isinstance(message, http.client.HTTPResponse)
        or not hasattr(fp, "readinto1")
        or not hasattr(message, "_get_chunk_left")
        or encoding != "identity"
    ):
        return None

    def read_into(buffer: memoryview) -> int:
        """Read the next piece of the body into ``buffer``; return its length, 0 at the end."""
        if message.chunked:
            left = message._get_chunk_left()  # reads the chunk-size line (and, at the end, the trailer)
            if left is None:
                return 0
        else:
            left = message.length
            if left is None:
                left = len(buffer)  # until the server closes the connection
            elif left == 0:
                message._close_conn()
                return 0
        got = fp.readinto1(buffer[: min(left, len(buffer))])
        if not got:
            if message.chunked or message.length is not None:
                raise http.client.IncompleteRead(b"")
            return 0
        if message.chunked:
            message.chunk_left = left - got
        elif message.length is not None:
            message.length -= got
        return got

    return BodyReader(read_into, raw.release_conn)
