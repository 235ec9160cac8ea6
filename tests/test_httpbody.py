"""Response bodies read straight into one reused buffer (xnatfs.httpbody) through XnatClient.stream, against
a real loopback server: every framing arrives whole and in order, a broken or stalled body fails in bounded
time, and a consumer that stops early is never kept waiting for the server."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from loopback import LoopbackServer

from xnatfs.client import XnatClient
from xnatfs.exceptions import ConnectionFailedError
from xnatfs.httpbody import CHUNK_SIZE

BODY = bytes(range(256)) * (3 * CHUNK_SIZE // 256 + 1001)  # several buffers' worth, not a multiple of one
RELEASE = threading.Event()  # a stalled answer waits for it


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        kind = self.path.split("?")[0].strip("/")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(BODY), 100_000):  # chunks smaller than a buffer, across its ends
                piece = BODY[start : start + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif kind == "length":
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif kind == "until-close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif kind == "broken":
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:5000])
            self.close_connection = True
        elif kind == "stall":
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:5000])
            self.wfile.flush()
            RELEASE.wait(30)
            self.close_connection = True


@pytest.fixture
def served():
    RELEASE.clear()
    with LoopbackServer(_Handler) as server:
        yield server
        RELEASE.set()


@pytest.mark.parametrize("kind", ["chunked", "length", "until-close"])
def test_every_framing_arrives_whole_and_the_session_goes_on(served, kind):
    client = XnatClient(served.base_url, timeout=5)
    try:
        for _ in range(2):  # a body read to its end leaves the session (and a reused connection) usable
            received = bytearray()
            with client.stream(f"/{kind}") as chunks:
                for chunk in chunks:
                    assert 0 < len(chunk) <= CHUNK_SIZE
                    received += chunk  # a piece is valid until the next one is asked for
            assert bytes(received) == BODY
    finally:
        client.close()


@pytest.mark.parametrize("path, timeout", [("/broken", 5), ("/stall", 1)])
def test_a_body_that_breaks_off_or_stalls_fails_with_the_cause_within_the_timeout(served, path, timeout):
    client = XnatClient(served.base_url, timeout=timeout)
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionFailedError, match="broke off"), client.stream(path) as chunks:
            for _ in chunks:
                pass
    finally:
        client.close()
    assert time.monotonic() - start < 5


def test_a_consumer_that_stops_early_is_not_kept_waiting(served):
    """The extractor refusing a hostile ZIP stops reading: the download ends at once, also when the server
    has stalled or has more to send, rather than after the timeout."""
    client = XnatClient(served.base_url, timeout=30)
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="refused"), client.stream("/stall"):
            raise ValueError("refused")
        with pytest.raises(ValueError, match="refused"), client.stream("/length") as chunks:
            next(iter(chunks))
            raise ValueError("refused")
    finally:
        client.close()
    assert time.monotonic() - start < 5
