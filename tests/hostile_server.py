"""A small, real HTTP server that speaks XNAT's listings with hostile names and serves hostile ZIPs.

The embedded server only serves what a file system can hold; this one sends what a broken or
malicious server could: names with ``/``, ``..``, control characters, and ZIP entries that escape.
"""

from __future__ import annotations

import io
import json
import zipfile
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from loopback import LoopbackServer

E = "/data/experiments/E1"  # resources are addressed by their xnat_abstractresource_id, as xnatfs does
LISTINGS = {
    "/data/projects": [{"ID": "P"}, {"ID": ".."}, {"ID": "a/b"}],
    "/data/projects/P/subjects": [{"ID": "S1", "label": "../../etc"}, {"ID": "S2", "label": "ok"}],
    "/data/projects/P/subjects/S2/experiments": [{"ID": "E1", "label": "E", "date": "2024-01-02"}],
    "/data/projects/P/subjects/S1/experiments": [],
    f"{E}/scans": [{"ID": "1", "type": "a/../b"}, {"ID": "2", "type": "clean"}],
    f"{E}/resources": [],
    f"{E}/scans/1/resources": [{"label": "DICOM", "xnat_abstractresource_id": "1"}],
    f"{E}/scans/2/resources": [{"label": "DICOM", "xnat_abstractresource_id": "2"}],
    f"{E}/scans/1/resources/1/files": [
        {"Name": "escape.txt", "URI": f"{E}/scans/1/resources/1/files/../../../escape.txt", "Size": "4"},
        {"Name": "ok.dcm", "URI": f"{E}/scans/1/resources/1/files/ok.dcm", "Size": "5"},
        {"Name": "bad\nname", "URI": f"{E}/scans/1/resources/1/files/bad\nname", "Size": "1"},
    ],
    f"{E}/scans/2/resources/2/files": [
        {"Name": "good.dcm", "URI": f"{E}/scans/2/resources/2/files/good.dcm", "Size": "5"},
    ],
}


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


ZIPS = {
    f"{E}/scans/1/resources/1/files": _zip(
        {
            "E/scans/1-a____b/resources/DICOM/files/../../../../../../../../escape.txt": b"evil",
            "E/scans/1-a____b/resources/DICOM/files/ok.dcm": b"hello",
        }
    ),
    f"{E}/scans/2/resources/2/files": _zip({"E/scans/2-clean/resources/DICOM/files/good.dcm": b"fine!"}),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        if parts.path == "/data/JSESSION":
            return self._send(200, b"HOSTILESESSION", "text/plain")
        if "format=zip" in parts.query and parts.path in ZIPS:
            return self._send(200, ZIPS[parts.path], "application/zip")
        if parts.path in LISTINGS and "all=true" not in parts.query:  # no bulk listings: per-level fallback
            body = json.dumps({"ResultSet": {"Result": LISTINGS[parts.path], "totalRecords": "0"}}).encode()
            return self._send(200, body, "application/json")
        return self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class HostileServer(LoopbackServer):
    """Runs in a thread on a free loopback port; ``url``; stop with ``close()`` or ``with``."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.url = self.base_url
