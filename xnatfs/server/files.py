"""File content over XNAT's REST API in `xnatfs serve`: file listings, ZIP downloads, single files,
uploads and the DICOM import. A mixin of the request handler (:mod:`.app` routes requests here)."""

from __future__ import annotations

import mimetypes
import os
import sys
import tempfile
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

from . import views
from .archive import READ_CHUNK, copy_exactly
from .http import HttpError
from .importer import import_dicom_zip
from .model import ResourceOwner
from .zipstream import ZipMember, stream_zip


class FileTransfer:
    """Request-handler methods that send or receive file content (mixed into app.RequestHandler)."""

    def _files(self, resources: list) -> None:
        """List the files of some resources, or (format=zip) stream them as an XNAT-style zip."""
        checksums = self.server.archive.checksums
        if self._query.get("format") != "zip":
            unreadable = [r for r in resources if r.meta.get("catalog_unreadable")]
            if unreadable:  # XNAT fails the whole listing when one catalog file cannot be read
                raise HttpError(404, f"Unable to read the catalog of resource {unreadable[0].xnat_id}")
            digests = checksums if self.server.checksums else None
            rows = [views.file_row(r, entry, digests) for r in resources for entry in r.files()]
            if self._query.get("all") == "true":  # bulk listings give URIs without the /data prefix
                for row in rows:
                    row["URI"] = row["URI"].removeprefix("/data")
            self._listing(None, rows)
            return
        members = [ZipMember(r.zip_name(entry.path), entry) for r in resources for entry in r.files()]
        if not members:
            raise HttpError(404, "No files match the selection")
        asked = None if self.server.ignore_compression_param else self._query.get("compression")
        try:
            level = int(asked or self.server.zip_compression)
        except ValueError as error:
            raise HttpError(400, "compression must be a number 0-9") from error
        if not 0 <= level <= 9:
            raise HttpError(400, "compression must be a number 0-9")
        self._start(
            200,
            {
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{resources[0].experiment.label}.zip"',
                "Transfer-Encoding": "chunked",
            },
            0 if self.command == "HEAD" else None,
        )
        if self.command == "HEAD":
            return
        hooks = self.server.hooks
        drop_after = hooks.drop_after_bytes if hooks else None
        try:
            for chunk in stream_zip(_refuse_duplicates(members), checksums.crc32, level):
                for piece in self._paced(chunk):
                    if drop_after is not None and self._sent + len(piece) >= drop_after:
                        self._write_chunk(piece[: drop_after - self._sent])
                        self._abort()
                        return
                    self._write_chunk(piece)
        except DuplicateEntry as error:
            # Java's ZipOutputStream throws mid-stream; XNAT then drops the connection.
            print(f"xnatfs serve: ZIP broken off: {error}", file=sys.stderr, flush=True)
            self._abort()
            return
        self._record(self._sent)
        self.wfile.write(b"0\r\n\r\n")

    def _file(self, resources: list, path: list[str]) -> None:
        """GET/HEAD one file of the first of `resources` that has it, sent from disk with its length."""
        targets = [self.server.archive.safe_path(r.directory, path) for r in resources]
        target = next((t for t in targets if t.is_file()), None)
        if target is None:
            raise HttpError(404, f"{'/'.join(path)} not found")
        with open(target, "rb") as handle:
            info = os.fstat(handle.fileno())
            content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            headers = {
                "Content-Type": content_type,
                "Content-Length": str(info.st_size),
                "Last-Modified": formatdate(info.st_mtime, usegmt=True),
            }
            self._start(200, headers, 0 if self.command == "HEAD" else info.st_size)
            if self.command == "HEAD":
                return
            if self.server.hooks and self.server.hooks.throttle:
                while chunk := handle.read(READ_CHUNK):
                    for piece in self._paced(chunk):
                        self.wfile.write(piece)
                        self._sent += len(piece)
            else:
                self._sent += self.connection.sendfile(handle, count=info.st_size)

    def _upload(self, owner: ResourceOwner, resource_key: str, path: list[str]) -> None:
        """PUT a file into a resource; an existing file without overwrite=true is reported, not replaced."""
        if "Content-Length" not in self.headers:
            raise HttpError(411, "Content-Length required")
        if not path:
            raise HttpError(400, "missing file name")
        overwrite = self._query.get("overwrite", "false").lower() == "true"
        length, self._body_left = self._body_left, 0
        try:
            stored = self.server.archive.write_file(owner, resource_key, path, self.rfile, length, overwrite)
        except EOFError as error:
            self.close_connection = True
            raise HttpError(400, str(error)) from error
        if stored:
            self._send_text("")
        else:
            self._body_left = length  # not read: skipped or the connection closed afterwards
            self._send_json({"duplicates": ["/".join(path)]})

    def _import(self) -> None:
        """POST /data/services/import: a zip of DICOM files becomes a session (see importer.py)."""
        length, self._body_left = self._body_left, 0
        with tempfile.NamedTemporaryFile(suffix=".zip") as upload:
            try:
                copy_exactly(self.rfile, upload, length)
            except EOFError as error:
                self.close_connection = True
                raise HttpError(400, str(error)) from error
            upload.flush()
            uri = import_dicom_zip(self.server.archive, Path(upload.name), self._query)
        self._send_text(uri + "\r\n")


class DuplicateEntry(Exception):
    """Two ZIP members with one name (XNAT's ZIP breaks off there)."""


def _refuse_duplicates(members: list[ZipMember]) -> Iterator[ZipMember]:
    """Yield the members; raise DuplicateEntry on reaching a name seen before (after streaming the others)."""
    seen: set[str] = set()
    for member in members:
        if member.name in seen:
            raise DuplicateEntry(f"duplicate entry: {member.name}")
        seen.add(member.name)
        yield member
