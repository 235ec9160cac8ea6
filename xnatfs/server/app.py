"""XNAT's REST routes of `xnatfs serve`, onto an Archive.

`/data/archive/...` and `/REST/...` are routed like `/data/...`. The request handler is built from
four parts besides the routes: the HTTP plumbing (:mod:`.http`), logging in (:mod:`.auth`), the
test hooks' faults (:mod:`.faults`) and sending or receiving file content (:mod:`.files`).
Stdlib only: a ThreadingHTTPServer, one daemon thread per connection.
"""

from __future__ import annotations

from collections.abc import Callable
from http.server import ThreadingHTTPServer
from importlib import resources as package_files
from urllib.parse import unquote, unquote_plus

from .. import __version__
from . import views
from .archive import AlreadyExists, Archive, InvalidName
from .auth import GUEST, Auth, Authentication
from .faults import FaultInjection, TestHooks
from .files import FileTransfer
from .http import HttpError, HttpHandler
from .importer import ImportFailed
from .model import Experiment, Project, ResourceOwner, Scan, Subject

XNAT_VERSION = "1.8.10"
SCHEMAS = ("xnat", "xdat")
# How a row of each top-level listing (/data/{kind}) shows an object.
ROWS = {"projects": views.project_row, "subjects": views.subject_row, "experiments": views.experiment_row}


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


class RequestHandler(FileTransfer, FaultInjection, Authentication, HttpHandler):
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
        serve = {"projects": self._project, "subjects": self._subject, "experiments": self._experiment}
        match parts:
            case [kind, *rest] if kind in serve:
                objects = index.of_kind(kind)
                self._collection(kind, list(objects.values()), objects.get, serve[kind], rest)
            case _:
                raise HttpError(404)

    def _collection(self, kind: str, objects: list, find: Callable, serve: Callable, rest: list[str]) -> None:
        """Serve `{kind}` (a listing of `objects`) or `{kind}/{key}/...` (`serve` the object `find(key)` gives)."""
        match rest:
            case []:
                self._listing(kind, [ROWS[kind](item) for item in objects])
            case [key, *more]:
                serve(find(key) or _missing(key), more)

    def _project(self, project: Project, rest: list[str]) -> None:
        match rest:
            case []:
                self._send_json(views.project_items(project))
            case ["accessibility"]:
                self._send_text(project.accessibility)
            case ["subjects", *more]:
                self._collection("subjects", list(project.subjects.values()), project.subject, self._subject, more)
            case _:
                self._experiments_below(list(project.experiments()), project.experiment, rest)

    def _subject(self, subject: Subject, rest: list[str]) -> None:
        if rest:
            self._experiments_below(list(subject.experiments.values()), subject.experiment, rest)
        else:
            self._send_json(views.subject_items(subject))

    def _experiments_below(self, experiments: list[Experiment], find: Callable, rest: list[str]) -> None:
        """Serve what projects and subjects both hold: `experiments[/...]`, and no resources."""
        match rest:
            case ["experiments", *more]:
                self._collection("experiments", experiments, find, self._experiment, more)
            case ["resources"] | ["files"]:
                self._listing(None, [])  # the on-disk layout has no project- or subject-level resources
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
