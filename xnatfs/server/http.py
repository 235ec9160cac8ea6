"""HTTP plumbing of `xnatfs serve`: a keep-alive HTTP/1.1 request handler that knows no route.

One request: its state, the answer (status and headers, whole bodies, chunks), errors turned into a
short plain-text answer (a server bug into 500 with its traceback on stderr), the unread body skipped
so the connection can be reused, and one log line on stderr (method, path, status, bytes,
milliseconds; never credentials or session ids). Subclasses implement `_dispatch`.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import __version__

MAX_DRAIN_BYTES = 1024 * 1024  # unread request bodies up to this size are skipped, larger ones close


class HttpError(Exception):
    """Answer the request with `status` and a short plain-text `message`."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message or {400: "Bad request", 404: "Not found", 405: "Method not allowed"}.get(status, "")


class HttpHandler(BaseHTTPRequestHandler):
    """The life cycle of one request and the ways to answer it; routes are the subclass's `_dispatch`."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server_version = f"xnatfs-serve/{__version__}"
    server: Any  # has `hooks` (the test hooks, or None): the request log

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        started = self._started = time.monotonic()
        self._status = 0
        self._sent = 0
        self._user = ""
        self._headers_sent = False
        self._recorded = False
        self._new_cookies: list[str] = []
        self._url = url = urlsplit(self.path)
        self._query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = self.headers.get("Content-Length") or "0"
        self._body_left = int(length) if length.isdigit() else 0
        self._is_hook = False  # a test-hook request: not in the request log
        try:
            self._dispatch()
        except HttpError as error:
            self._fail(error.status, error.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a server bug: answer 500 like XNAT does, and show the traceback
            traceback.print_exc()
            self.close_connection = True
            self._fail(500, "Internal server error")
        finally:
            self._record(self._sent)
            self._finish_body()
            self._log(url.path, started)

    def _dispatch(self) -> None:
        """Answer the request (``self._url``, ``self._query``); raise HttpError for an error answer."""
        raise HttpError(404)

    def _record(self, body_bytes: int) -> None:
        """Add this request to the test hooks' request log, once.

        Responses call this just before their last bytes go out, so a client that has seen a complete
        response always finds it in the log.
        """
        hooks = self.server.hooks
        if hooks and not self._is_hook and not self._recorded:
            self._recorded = True
            entry = {"method": self.command, "path": self._url.path, "query": self._url.query}
            # Monotonic start and end, so tests can tell how many requests were in flight at once.
            times = {"started": self._started, "finished": time.monotonic()}
            hooks.record({**entry, "status": self._status, "bytes": body_bytes, "user": self._user, **times})

    def _finish_body(self) -> None:
        """Skip an unread small request body so the connection can be reused; close after a big one."""
        if self._body_left and not self.close_connection:
            if self._body_left > MAX_DRAIN_BYTES:
                self.close_connection = True
            else:
                self.rfile.read(self._body_left)
        self._body_left = 0

    def _log(self, path: str, started: float) -> None:
        millis = (time.monotonic() - started) * 1000
        print(
            f"{self.log_date_time_string()} {self.command} {path} {self._status} {self._sent} {millis:.0f}ms",
            file=sys.stderr,
            flush=True,
        )

    def log_request(self, code="-", size="-") -> None:
        """Record the status (BaseHTTPRequestHandler would print its own log line here)."""
        self._status = int(code) if str(code).isdigit() else 0

    def log_message(self, format: str, *args) -> None:
        """Silence the stdlib's default logging; errors it reports still go to stderr, briefly."""
        if format.startswith(("code ", "Request timed out")):
            print(f"xnatfs serve: {format % args}", file=sys.stderr, flush=True)

    def _start(self, status: int, headers: dict[str, str], body_bytes: int | None) -> None:
        """Send the status and headers; `body_bytes` is the body size to log, None if not known yet."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        for cookie in self._new_cookies:
            self.send_header("Set-Cookie", cookie)
        if body_bytes is not None:
            self._record(body_bytes)
        self.end_headers()
        self._headers_sent = True

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self._start(status, headers, 0 if self.command == "HEAD" else len(body))
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _send_text(self, text: str, status: int = 200) -> None:
        self._send(status, text.encode("utf-8"), "text/plain;charset=UTF-8")

    def _send_json(self, data) -> None:
        self._send(200, json.dumps(data).encode("utf-8"), "application/json;charset=UTF-8")

    def _fail(self, status: int, message: str) -> None:
        if self._headers_sent:  # too late for a status: the client must see a broken transfer instead
            self._abort()
            return
        self._send(status, message.encode("utf-8"), "text/plain;charset=UTF-8")

    def _abort(self) -> None:
        """Close the connection with a reset (no orderly end), as a crashed server would."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _read_body(self, limit: int) -> bytes:
        if self._body_left > limit:
            raise HttpError(413, "request body too large")
        body = self.rfile.read(self._body_left)
        self._body_left = 0
        return body

    def _write_chunk(self, chunk: bytes) -> None:
        if chunk:
            self.wfile.write(b"%x\r\n" % len(chunk))
            self.wfile.write(chunk)
            self.wfile.write(b"\r\n")
            self._sent += len(chunk)
