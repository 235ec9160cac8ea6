"""XNAT's REST routes of `xnatfs serve`, onto an Archive.

`/data/archive/...` and `/REST/...` are routed like `/data/...`. The request handler is built from
three parts besides the routes: the HTTP plumbing (:mod:`.http`), logging in (:mod:`.auth`) and the
test hooks' faults (:mod:`.faults`). Stdlib only: a ThreadingHTTPServer, one daemon thread per connection.
"""

from __future__ import annotations

import mimetypes
import os
import sys
import tempfile
from collections.abc import Iterator
from email.utils import formatdate
from http.server import ThreadingHTTPServer
from importlib import resources as package_files
from pathlib import Path
from urllib.parse import unquote, unquote_plus

from .. import __version__
from . import views
from .archive import READ_CHUNK, AlreadyExists, Archive, InvalidName, copy_exactly
from .auth import GUEST, Auth, Authentication
from .faults import FaultInjection, TestHooks
from .http import HttpError, HttpHandler
from .importer import ImportFailed, import_dicom_zip
from .model import Experiment, ResourceOwner, Scan
from .zipstream import ZipMember, stream_zip

XNAT_VERSION = "1.8.10"
SCHEMAS = ("xnat", "xdat")


class XnatHTTPServer(ThreadingHTTPServer):
    """The listening server; handlers reach the archive, auth and (optional) test hooks through it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        archive: Archive,
        auth: Auth,
        hooks: TestHooks | None,
        require_login: bool = True,
        zip_compression: int = 0,
        checksums: bool = True,
        ignore_compression_param: bool = False,
    ) -> None:
        super().__init__(address, RequestHandler)
        self.archive = archive
        self.auth = auth
        self.hooks = hooks
        # XNAT's site settings: requireLogin=false serves requests without credentials as the guest
        # user (public projects only); zipCompressionMethod picks STORED (0) or DEFLATE for ZIPs.
        self.require_login = require_login
        self.zip_compression = zip_compression
        # True: zip_compression even when a request asks for ?compression= (a server that always deflates).
        self.ignore_compression_param = ignore_compression_param
        self.checksums = checksums  # XNAT's checksums setting: without it, file listings carry no digest


class RequestHandler(FaultInjection, Authentication, HttpHandler):
    """XNAT's REST routes onto the archive."""

    server: XnatHTTPServer

    def _dispatch(self) -> None:
        """Route the request: `/_test/...` to the test hooks, the rest (faults first) to XNAT's routes."""
        parts = split_path(self._url.path)
        if parts[:1] == ["REST"]:  # the pre-1.5 name of /data
            parts = ["data", *parts[1:]]
        if parts[:2] == ["data", "archive"]:
            parts = ["data", *parts[2:]]
        hooks = self.server.hooks
        self._is_hook = parts[:1] == ["_test"]
        try:
            if self._is_hook:
                self._test_hook(parts[1:])
            elif not (hooks and self._inject_faults(hooks, self._url.path)):
                self._route(parts)
        except InvalidName as error:
            raise HttpError(400, str(error)) from error
        except AlreadyExists as error:
            raise HttpError(409, f"{error} already exists") from error
        except ImportFailed as error:
            raise HttpError(error.status, str(error)) from error

    def _route(self, parts: list[str]) -> None:
        method = self.command
        if not parts:
            self._authenticate()  # an alias-token login reads the session cookie from this answer
            self._send_text(f"XNAT-compatible server (xnatfs {__version__})")
            return
        if parts == ["data", "services", "auth"] and method in ("PUT", "POST"):
            self._login()
            return
        user = self._authenticate()
        if user is None:
            self._unauthorized()
            return
        if parts[0] == "xapi":
            self._xapi(parts[1:])
        elif parts[0] == "data" and len(parts) > 1:
            self._data(parts[1:], user)
        else:
            raise HttpError(404)

    def _xapi(self, parts: list[str]) -> None:
        match parts:
            case ["siteConfig", "buildInfo"]:
                self._send_json({"version": XNAT_VERSION, "buildNumber": "xnatfs", "commit": "xnatfs-serve"})
            case ["siteConfig", "buildInfo", "version"]:
                self._send_text(XNAT_VERSION)
            case ["schemas"]:
                self._send_json(list(SCHEMAS))
            case ["schemas", name] if name in SCHEMAS:
                schema = package_files.files(__package__).joinpath("schemas", f"{name}.xsd").read_bytes()
                self._send(200, schema, "application/xml")
            case _:
                raise HttpError(404)

    def _data(self, parts: list[str], user: str) -> None:
        method = self.command
        match parts:
            case ["auth"]:
                self._send_text(f"User '{user}' is logged in")
            case ["JSESSION"] if method == "DELETE":
                session_id = self._cookie_session()
                if session_id:
                    self.server.auth.end_session(session_id)
                self._send_text("")
            case ["JSESSION"]:
                session_id = self._cookie_session()
                if self.server.auth.session_user(session_id) != user:
                    session_id = self.server.auth.new_session(user)
                    self._set_session_cookie(session_id)
                self._send_text(session_id)
            case ["version"]:
                raise HttpError(404)  # XNAT >= 1.7 has no /data/version; clients then ask /xapi
            case ["search", "elements"]:
                self._send_json(views.result_set([]))
            case ["services", "tokens", "issue"]:
                self._send_json(self.server.auth.issue_token(user))
            case ["services", "import"] if method == "POST":
                self._import()
            case _:
                self._archive(parts)

    def _archive(self, parts: list[str]) -> None:
        if self.command in ("POST", "DELETE") or (self.command == "PUT" and "resources" not in parts):
            raise HttpError(405, "only resources and files can be written here")
        index = self.server.archive.index()
        if self._user == GUEST:
            if self.command == "PUT":
                raise HttpError(403, "guests cannot write")
            index = index.public()  # other projects are unknown to a guest: 404, as in XNAT
        match parts:
            case ["projects"]:
                self._listing("projects", [views.project_row(p) for p in index.projects.values()])
            case ["subjects"]:
                self._listing("subjects", [views.subject_row(s) for s in index.subjects.values()])
            case ["experiments"]:
                self._listing("experiments", [views.experiment_row(e) for e in index.experiments.values()])
            case ["subjects", subject_id, *rest]:
                subject = index.subjects.get(subject_id) or _missing(subject_id)
                self._subject(subject, rest)
            case ["experiments", experiment_id, *rest]:
                experiment = index.experiments.get(experiment_id) or _missing(experiment_id)
                self._experiment(experiment, rest)
            case ["projects", project_id, *rest]:
                project = index.projects.get(project_id) or _missing(project_id)
                self._project(project, rest)
            case _:
                raise HttpError(404)

    def _project(self, project, rest: list[str]) -> None:
        match rest:
            case []:
                self._send_json(views.project_items(project))
            case ["accessibility"]:
                self._send_text(project.accessibility)
            case ["subjects"]:
                self._listing("subjects", [views.subject_row(s) for s in project.subjects.values()])
            case ["subjects", key, *more]:
                self._subject(project.subject(key) or _missing(key), more)
            case ["experiments"]:
                self._listing("experiments", [views.experiment_row(e) for e in project.experiments()])
            case ["experiments", key, *more]:
                self._experiment(project.experiment(key) or _missing(key), more)
            case ["resources"] | ["files"]:
                self._listing(None, [])  # the on-disk layout has no project-level resources
            case _:
                raise HttpError(404)

    def _subject(self, subject, rest: list[str]) -> None:
        match rest:
            case []:
                self._send_json(views.subject_items(subject))
            case ["experiments"]:
                self._listing("experiments", [views.experiment_row(e) for e in subject.experiments.values()])
            case ["experiments", key, *more]:
                self._experiment(subject.experiment(key) or _missing(key), more)
            case ["resources"] | ["files"]:
                self._listing(None, [])  # the on-disk layout has no subject-level resources
            case _:
                raise HttpError(404)

    def _experiment(self, experiment: Experiment, rest: list[str]) -> None:
        match rest:
            case []:
                self._send_json(views.experiment_items(experiment))
            case ["scans", *_] if not experiment.is_image_session:
                raise HttpError(404, f"{experiment.label} is not an image session: it has no scans")
            case ["scans"]:
                self._listing("scans", [views.scan_row(s) for s in experiment.scans.values()])
            case ["scans", selector]:
                scans = _select(experiment.scans, selector)
                if len(scans) == 1 and selector != "ALL":
                    self._send_json(views.scan_items(scans[0]))
                else:
                    self._listing("scans", [views.scan_row(s) for s in scans])
            case ["scans", selector, *more]:
                self._resources(_select(experiment.scans, selector), more)
            case ["assessors"]:
                self._listing("assessors", [views.assessor_row(a) for a in experiment.assessors.values()])
            case ["assessors", "ALL", *more]:
                self._resources(list(experiment.assessors.values()), _skip_out(more))
            case ["assessors", key]:
                self._send_json(views.assessor_items(experiment.assessor(key) or _missing(key)))
            case ["assessors", key, *more]:
                self._resources([experiment.assessor(key) or _missing(key)], _skip_out(more))
            case ["resources"] | ["files"] if self._query.get("all") == "true":
                # XNAT's bulk listings: the session's resources and those of its scans and assessors.
                owners = [experiment, *experiment.scans.values(), *experiment.assessors.values()]
                self._resources(owners, rest)
            case ["resources" | "files", *_]:
                self._resources([experiment], rest)
            case _:
                raise HttpError(404)

    def _resources(self, owners: list[ResourceOwner], rest: list[str]) -> None:
        """Serve `.../resources[/{id|label}[/files[/{path}]]]` or `.../files` below some owners."""
        method = self.command
        match rest:
            case ["resources", key] if method == "PUT":
                owner = _single(owners)
                meta = {k: self._query[k] for k in ("format", "content", "tags") if self._query.get(k)}
                self.server.archive.create_resource(owner, key, meta)
                self._send_text("")
            case ["resources", key, "files", *path] if method == "PUT":
                self._upload(_single(owners), key, path)
            case _ if method == "PUT":
                raise HttpError(405, "only resources and files can be written here")
            case ["resources"]:
                rows = [views.resource_row(r) for o in owners for r in o.resources.values()]
                self._listing(None, rows)
            case ["resources", key]:
                resource = _single(owners).resource(key) or _missing(key)
                self._send(200, views.catalog_xml(resource, self.server.archive.checksums), "application/xml")
            case ["resources", key, "files"]:
                # A key that selects nothing gives an empty listing (and a 404 ZIP), as in XNAT.
                self._files([r for o in owners for r in o.select(key)])
            case ["resources", key, "files", *path]:
                self._file(_single(owners).select(key), path)
            case ["files"]:
                self._files([r for o in owners for r in o.resources.values()])
            case _:
                raise HttpError(404)

    def _listing(self, kind: str | None, rows: list[dict]) -> None:
        columns = [c for c in self._query.get("columns", "").split(",") if c]
        self._send_json(views.result_set(rows, kind, columns))

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


def split_path(path: str) -> list[str]:
    """Split a request path into segments the way XNAT's REST layer reads them.

    Segments are percent-decoded except two: the one after `resources` (a resource selector is
    matched as sent, so a quoted label matches nothing) and the file path after `files`, which is
    decoded (URL-form decoding, `+` as a space) only when it contains `%20` or `%2B`.
    """
    raw = [p for p in path.split("/") if p]
    parts: list[str] = []
    index = 0
    while index < len(raw):
        segment = raw[index]
        if segment == "resources" and index + 1 < len(raw) and parts[:1] != ["_test"]:
            parts += ["resources", raw[index + 1]]
            index += 2
            continue
        if segment == "files" and len(parts) > 1:
            rest = "/".join(raw[index + 1 :])
            if "%20" in rest or "%2B" in rest:
                rest = unquote_plus(rest)
            parts += ["files", *[p for p in rest.split("/") if p]]
            break
        parts.append(unquote(segment))
        index += 1
    return parts


def _missing(key: str):
    raise HttpError(404, f"{key} not found")


def _select(scans: dict[str, Scan], selector: str) -> list[Scan]:
    """Return the scans named by `selector`: one ID, a comma list of IDs or ALL; 404 if one is unknown."""
    if selector == "ALL":
        return list(scans.values())
    return [scans.get(key) or _missing(key) for key in selector.split(",")]


def _single(owners: list[ResourceOwner]) -> ResourceOwner:
    if len(owners) != 1:
        raise HttpError(400, "this needs a single scan or assessor, not a list")
    return owners[0]


def _skip_out(rest: list[str]) -> list[str]:
    """Assessor resources are addressed as .../out/resources/... in XNAT and .../resources/... by clients."""
    return rest[1:] if rest[:1] == ["out"] else rest
