"""Reading an HTTP response body straight from its socket, in a thread of its own, ahead of its consumer.

A download is two jobs: receiving (a copy out of the socket) and using the bytes (extracting a ZIP: a CRC
and a copy into the page cache per member). Done one after the other in one thread, each waits for the
other; here a reader thread receives the next pieces while the consumer works on the current one, so a
download takes about as long as the slower of the two instead of their sum. Both spend their time in system
calls and C code that release the GIL.

The reader reads each piece with one ``readinto1`` of the socket's buffered reader into one of a few
buffers that are used again and again (no allocation, no zero-filling per piece); a piece is handed on as
a memoryview of its buffer, valid until the consumer asks for the next one. The chunked framing stays
http.client's. At most :data:`BUFFERS` pieces exist at once, so memory stays bounded whatever the speed of
either side.
"""

from __future__ import annotations

import contextlib
import http.client
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

CHUNK_SIZE = 1 << 20  # at most this many body bytes per piece: one socket read
BUFFERS = 4  # pieces in flight at most: one being received, the others waiting or being used


class BodyReader:
    """Iterates over a response body, piece by piece (memoryviews), received ahead in a thread.

    Each piece is valid until the next one is asked for (its buffer is then filled again). Raises what
    the socket layer raises (OSError, TimeoutError, http.client.IncompleteRead, ValueError) from the
    iteration. :meth:`close` stops the reader (waking it from a blocked read by shutting the socket
    down) and must be called before the connection is closed; a body read to its end gives its
    connection back to the pool.
    """

    def __init__(self, read_into: Callable[[memoryview], int], sock: socket.socket | None, on_end: Callable[[], None]):
        self._read_into = read_into
        self._sock = sock
        self._on_end = on_end
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray | None, Any]] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(CHUNK_SIZE))
        self._lock = threading.Lock()  # orders the reader's last read and the end of the socket
        self._stop = False
        self._reading = True  # the reader may still read from the socket (guarded by _lock)
        self._ended = False
        self._held: bytearray | None = None
        self._thread = threading.Thread(target=self._run, name="xnatfs-body-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                buffer = self._free.get()
                if buffer is None or self._stop:
                    return
                got = self._read_into(memoryview(buffer))
                if not got:
                    with self._lock:
                        if self._stop:  # the socket was shut down under the read: never give it back
                            return
                        self._reading = False
                    self._full.put((buffer, 0))
                    self._on_end()
                    return
                self._full.put((buffer, got))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, who raises it
            with self._lock:
                self._reading = False
            self._full.put((None, error))

    def __iter__(self) -> Iterator[memoryview]:
        return self

    def __next__(self) -> memoryview:
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        if self._ended:
            raise StopIteration
        buffer, got = self._full.get()
        if buffer is None:
            self._ended = True
            raise got
        if not got:
            self._ended = True
            raise StopIteration
        self._held = buffer
        return memoryview(buffer)[:got]

    def close(self) -> None:
        """Stop the reader thread and wait for it (at once, also when it is blocked reading)."""
        with self._lock:
            self._stop = True
            if self._reading and self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read; the connection is not reused
        self._free.put(None)
        self._thread.join()


def direct_body(response: Any) -> BodyReader | None:
    """Return a :class:`BodyReader` of a ``requests`` response's body, or None where it does not apply.

    It applies to bodies without Content-Encoding read through http.client (length known, chunked, or up to
    the end of the connection). Reads go straight into the reader's buffers: no copy through urllib3's and
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

    return BodyReader(read_into, _socket_of(fp), raw.release_conn)


def _socket_of(fp: Any) -> socket.socket | None:
    """Return the socket under http.client's buffered reader (a ``SocketIO`` in a ``BufferedReader``)."""
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
