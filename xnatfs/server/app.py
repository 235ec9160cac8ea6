"""The HTTP side of `xnatfs serve`: routes XNAT's REST paths onto an Archive.

Stdlib only: a ThreadingHTTPServer (one daemon thread per connection) with an HTTP/1.1 keep-alive
handler. `/data/archive/...` is routed like `/data/...`. Every request is logged as one line on stderr
(method, path, status, bytes, milliseconds; never credentials or session ids).
"""

from __future__ import annotations

import json
import mimetypes
import os
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from email.utils import formatdate
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources as package_files
from pathlib import Path
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from .. import __version__
from . import views
from .archive import (
    READ_CHUNK,
    AlreadyExists,
    Archive,
    Experiment,
    InvalidName,
    ResourceOwner,
    Scan,
    copy_exactly,
)
from .auth import GUEST, Auth, parse_basic
from .faults import TestHooks
from .importer import ImportFailed, import_dicom_zip
from .zipstream import ZipMember, stream_zip

XNAT_VERSION = "1.8.10"
SCHEMAS = ("xnat", "xdat")
REALM = 'Basic realm="XNAT Protected Area"'
MAX_DRAIN_BYTES = 1024 * 1024  # unread request bodies up to this size are skipped, larger ones close
SESSION_COOKIE = "JSESSIONID"


class HttpError(Exception):
    """Answer the request with `status` and a short plain-text `message`."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message or {400: "Bad request", 404: "Not found", 405: "Method not allowed"}.get(status, "")


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


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server_version = f"xnatfs-serve/{__version__}"
    server: XnatHTTPServer

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

    # -- request life cycle ------------------------------------------------------------------------

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
        parts = split_path(url.path)
        if parts[:1] == ["REST"]:  # the pre-1.5 name of /data
            parts = ["data", *parts[1:]]
        if parts[:2] == ["data", "archive"]:
            parts = ["data", *parts[2:]]
        hooks = self.server.hooks
        self._is_hook = parts[:1] == ["_test"]
        try:
            if self._is_hook:
                self._test_hook(parts[1:])
            else:
                if hooks and self._inject_faults(hooks, url.path):
                    return
                self._route(parts)
        except HttpError as error:
            self._fail(error.status, error.message)
        except InvalidName as error:
            self._fail(400, str(error))
        except AlreadyExists as error:
            self._fail(409, f"{error} already exists")
        except ImportFailed as error:
            self._fail(error.status, str(error))
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

    def _inject_faults(self, hooks: TestHooks, path: str) -> bool:
        """Apply the active test faults; returns True when the request has been dealt with."""
        if hooks.refuse:
            self._abort()
            return True
        hooks.wait_while_stalled()
        if hooks.latency:
            time.sleep(hooks.latency)
        status = hooks.error_for(path)
        if status is not None:
            self._fail(status, "Injected error")
            return True
        return False

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

    # -- responses ---------------------------------------------------------------------------------

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

    def _unauthorized(self) -> None:
        self._send(401, b"Authentication required", "text/plain;charset=UTF-8", {"WWW-Authenticate": REALM})

    # -- authentication ----------------------------------------------------------------------------

    def _cookie_session(self) -> str | None:
        cookies = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except Exception:  # a malformed Cookie header counts as no cookie
            return None
        morsel = cookies.get(SESSION_COOKIE)
        return morsel.value if morsel else None

    def _authenticate(self) -> str | None:
        """Return the user of this request (session cookie or Basic auth), or None.

        Like XNAT: Basic credentials for the user the session holds are not checked again; other
        Basic credentials are, and open a new session (cookie). Without credentials and without a
        live session, a site with requireLogin=false answers as the guest user.
        """
        auth = self.server.auth
        session_user = auth.session_user(self._cookie_session())
        header = self.headers.get("Authorization")
        if parse_basic(header)[0] is not None:
            user = auth.check_basic(header, session_user)
            if user is not None and user != session_user:
                self._set_session_cookie(auth.new_session(user))
        elif session_user is not None:
            user = session_user
        elif not self.server.require_login:
            user = GUEST
        else:
            user = None
        self._user = user or ""
        return user

    def _set_session_cookie(self, session_id: str) -> None:
        self._new_cookies.append(f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly")

    def _login(self) -> None:
        """PUT/POST /data/services/auth with a form body username=..&password=.. -> the session id."""
        form = {k: v[0] for k, v in parse_qs(self._read_body(MAX_DRAIN_BYTES).decode("utf-8", "replace")).items()}
        user = self.server.auth.check_password(form.get("username", ""), form.get("password", ""))
        if user is None:
            self._send_text("Authentication failed.", 401)
            return
        session_id = self.server.auth.new_session(user)
        self._user = user
        self._set_session_cookie(session_id)
        self._send_text(session_id)

    def _read_body(self, limit: int) -> bytes:
        if self._body_left > limit:
            raise HttpError(413, "request body too large")
        body = self.rfile.read(self._body_left)
        self._body_left = 0
        return body

    # -- routing -----------------------------------------------------------------------------------

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

    # -- listings and downloads --------------------------------------------------------------------

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

    def _paced(self, data: bytes) -> Iterator[bytes]:
        """Yield `data` whole, or in slices at the test hooks' throttle rate (re-read per slice)."""
        hooks = self.server.hooks
        while data:
            rate = hooks.throttle if hooks else None
            if not rate:
                yield data
                return
            piece, data = data[: max(1024, rate // 10)], data[max(1024, rate // 10) :]
            yield piece
            time.sleep(len(piece) / rate)

    def _write_chunk(self, chunk: bytes) -> None:
        if chunk:
            self.wfile.write(b"%x\r\n" % len(chunk))
            self.wfile.write(chunk)
            self.wfile.write(b"\r\n")
            self._sent += len(chunk)

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

    # -- uploads -----------------------------------------------------------------------------------

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

    # -- test hooks --------------------------------------------------------------------------------

    def _test_hook(self, parts: list[str]) -> None:
        hooks = self.server.hooks
        if hooks is None:
            raise HttpError(404)
        match self.command, parts:
            case "GET", ["requests"]:
                self._send_json(hooks.requests())
            case "DELETE", ["requests"]:
                hooks.clear_requests()
                self._send_text("")
            case "PUT", ["faults"]:
                try:
                    hooks.set_faults(json.loads(self._read_body(MAX_DRAIN_BYTES) or b"{}"))
                except (ValueError, TypeError) as error:
                    raise HttpError(400, str(error)) from error
                self._send_text("")
            case "DELETE", ["faults"]:
                hooks.clear_faults()
                self._send_text("")
            case "POST", ["expire-sessions"]:
                self.server.auth.expire_all_sessions()
                self._send_text("")
            case "PUT", ["password"]:
                self.server.auth.set_password(self._read_body(MAX_DRAIN_BYTES).decode("utf-8"))
                self._send_text("")
            case "POST", ["unlock"]:
                self.server.auth.unlock()
                self._send_text("")
            case _:
                raise HttpError(404)


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
