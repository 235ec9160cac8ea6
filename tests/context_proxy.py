"""A reverse proxy that serves an XNAT server below a context path, as Tomcat serves XNAT at `/xnat`.

`ContextProxy(upstream).url` is `http://127.0.0.1:PORT/xnat`; a request outside the context path
answers 404, so a client that forgets the context path fails. Bodies are streamed both ways.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

import requests
from loopback import LoopbackServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate"}


class ContextProxy(LoopbackServer):
    def __init__(self, upstream: str, context: str = "/xnat") -> None:
        self.upstream = upstream.rstrip("/")
        self.context = context
        self.outside: list[str] = []  # request paths that missed the context path
        self._http = requests.Session()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                if not self.path.startswith(proxy.context + "/"):
                    proxy.outside.append(self.path)
                    self.send_error(404)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                reply = proxy._http.request(
                    self.command,
                    proxy.upstream + self.path[len(proxy.context) :],
                    headers=headers,
                    data=body,
                    stream=True,
                    allow_redirects=False,
                    timeout=60,
                )
                self.send_response(reply.status_code)
                for key, value in reply.raw.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                if self.command != "HEAD":
                    for chunk in reply.raw.stream(1 << 16, decode_content=False):
                        self.wfile.write(chunk)
                reply.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        super().__init__(Handler)
        self.url = self.base_url + context

    def close(self) -> None:
        super().close()
        self._http.close()
