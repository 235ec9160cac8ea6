"""The XNAT tree: folders from XNAT's JSON listings (bulk where the server allows), metadata from
the rows; see :mod:`xnatfs.transports.xnat` for the layout."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache

from xnatfs import __version__
from xnatfs.client import XnatClient, quote_part
from xnatfs.exceptions import NotFoundError, ServerError
from xnatfs.extract import ExtractLimits
from xnatfs.names import scan_folder, unique_names
from xnatfs.transports.base import AbstractTransport, Entry, normpath
from xnatfs.transports.xnat.content import XnatContent
from xnatfs.transports.xnat.names import join, parse_date, resource_names, server_url, version_fraction
from xnatfs.transports.xnat.refs import (
    ExperimentRef,
    FileListing,
    ProjectRef,
    RemoteFile,
    Resource,
    ScanRef,
    SubjectRef,
    decode_ref,
    encode_ref,
    file_listing,
)

log = logging.getLogger(__name__)


class XnatTransport(XnatContent, AbstractTransport):
    """An XNAT server (``http://``, ``https://``, ``xnat://`` = https), read and write.

    Options: ``user``, ``password`` (or an alias token and its secret), ``timeout`` (seconds,
    default 30), ``cache`` (a :class:`~xnatfs.cache.Cache`) or ``cache_dir`` and ``cache_size``,
    ``ttl``, ``verify`` (TLS verification, default True), ``extract_limits``
    (:class:`~xnatfs.extract.ExtractLimits`), ``session`` (an existing XnatClient).
    """

    name = "xnat"
    description = "XNAT imaging archive over its REST API; scan resources fetched as ZIPs into the cache."
    authors = "xnatfs developers"
    version = __version__
    url = "https://xnat.org"
    schemes = ["http", "https", "xnat"]
    options = ()  # command-line options of its own (xnatfs.options.Option)
    needs_credentials = True  # the CLI resolves --user, XNAT_USER/XNAT_PASS or ~/.netrc for it

    def _setup(self) -> None:
        self.server_url = server_url(self.opts.get("url"), self.netloc, self.root)
        self.session: XnatClient = self.opts.get("session") or XnatClient(
            self.server_url,
            self.opts.get("user"),
            self.opts.get("password"),
            timeout=self.timeout,
            verify=self.opts.get("verify", True),
        )
        self.limits: ExtractLimits = self.opts.get("extract_limits") or ExtractLimits()
        self.started = time.time()
        self.downloads = 0  # ZIP downloads started by this transport
        # Each resource's FileListing, built from its rows (kept with them: rebuilt when they change).
        self._file_listings: LRUCache[str, tuple[object, FileListing]] = LRUCache(maxsize=10_000)

    def close(self) -> None:
        super().close()
        self.session.close()

    def catalog_scope(self) -> str:
        return f"xnat|{self.server_url}|{self.session.user or ''}"

    def _check_source(self, within: float | None = None) -> None:
        self.session.login(within)  # bad credentials or a dead server show here, even with a fresh catalog
        self.listdir("/")

    # -- catalog refs ---------------------------------------------------------------------

    def _encode_ref(self, ref: Any) -> Any:
        return super()._encode_ref(encode_ref(ref))

    def _decode_ref(self, data: Any) -> Any:
        return decode_ref(data)

    # -- listings -------------------------------------------------------------------------

    def _list(self, path: str) -> list[Entry]:
        if path.startswith("\0"):
            return [Entry("", False, ref=self._bulk(path))]
        parts = [] if path == "/" else path.strip("/").split("/")
        if len(parts) == 0:
            return self._projects()
        if len(parts) == 1:
            return self._subjects(parts[0])
        if len(parts) == 2:
            return self._experiments(parts[0], self.stat(path))
        experiment = self.stat(join(parts[:3]))
        if len(parts) == 3:
            if not experiment.ref.has_scans:
                return [self._folder("resources", experiment)]  # e.g. xnat:subjectVariablesData: no scans
            return [self._folder("scans", experiment), self._folder("resources", experiment)]
        if parts[3] == "scans":
            if len(parts) == 4:
                try:
                    return self._scans(experiment)
                except NotFoundError:
                    return []  # XNAT answers 404 for experiments without scans (subject assessors)
            scan = self.stat(join(parts[:5]))
            if len(parts) == 5:
                return [self._folder("resources", scan, experiment.mtime)]
            if parts[5] != "resources":
                raise FileNotFoundError(path)
            return self._resource_level(parts, 6, experiment, scan.ref)
        if parts[3] == "resources":
            return self._resource_level(parts, 4, experiment, None)
        raise FileNotFoundError(path)

    # Bulk listings: one request for what a per-level walk asks many for. Kept under keys that are
    # not paths (a NUL and the kind), cached and persisted like folder listings. None: the server
    # refused the bulk request (e.g. one unreadable catalog in the session): list per level instead.

    def _bulk(self, key: str) -> Any:
        kind, _, arg = key[1:].partition("\0")
        if kind == "experiments":  # all experiments of project `arg`, with their subjects
            columns = "ID,label,subject_ID,subject_label,xsiType,date,insert_date"
            return self._rows_or_none(f"/data/projects/{quote_part(arg)}/experiments", columns)
        if kind == "resources":  # all resources of experiment `arg`, its scans' included
            return self._rows_or_none(f"/data/experiments/{quote_part(arg)}/resources?all=true")
        if kind == "files":  # all files of experiment `arg`, by resource ID
            rows = self._rows_or_none(f"/data/experiments/{quote_part(arg)}/files?all=true")
            if rows is None:
                return None
            grouped: dict[str, list[dict[str, str]]] = {}
            for row in rows:
                grouped.setdefault(str(row.get("cat_ID") or ""), []).append(row)
            return grouped
        if kind == "resource-files":  # one resource's files (`arg` is its API path)
            return self._rows(arg + "/files")
        raise FileNotFoundError(key)

    def _raw(self, key: str) -> Any:
        """Return the value of bulk listing ``key`` (cached like a folder listing)."""
        return self._listing(key)[""].ref

    def _rows(self, path: str, columns: str | None = None) -> list[dict[str, str]]:
        """Return the rows of a listing request, holding a listing slot (bounds requests in flight)."""
        with self._listing_slots:
            return self.session.get_rows(path, columns)

    def _rows_or_none(self, path: str, columns: str | None = None) -> list[dict[str, str]] | None:
        try:
            return self._rows(path, columns)
        except (NotFoundError, ServerError) as error:
            log.info("%s: bulk listing refused (%s); listing level by level", path.split("?")[0], error)
            return None

    def _readahead_keys(self, path: str, entries: dict[str, Entry]) -> list[str]:
        parts = path.strip("/").split("/")
        if path == "/" or len(parts) != 2:
            return super()._readahead_keys(path, entries)
        # A subject: what its experiments' folders are made of (3 requests per experiment, not one
        # per scan and resource); never anything below.
        keys = []
        for entry in entries.values():
            if not isinstance(entry.ref, ExperimentRef) or not entry.ref.id:
                continue
            eid = entry.ref.id
            if entry.ref.has_scans:
                keys.append(f"{path}/{entry.name}/scans")
            keys += [f"\0resources\0{eid}", f"\0files\0{eid}"]
        return keys

    def _forget(self, *keys: str) -> None:
        """Drop bulk listings (memory and catalog) after a change made through this transport."""
        with self._lock:
            for key in keys:
                self._listings.pop(key, None)
        if self.catalog is not None:
            for key in keys:
                self.catalog.forget(key)

    def _resource_level(self, parts: list[str], at: int, experiment: Entry, scan: ScanRef | None) -> list[Entry]:
        """List ``.../resources`` (``parts[at]`` absent), ``.../resources/{label}`` or below ``files``."""
        if len(parts) == at:
            return self._resources(experiment, scan)
        resource = self.stat(join(parts[: at + 1]))
        if len(parts) == at + 1:
            return [self._folder("files", resource, experiment.mtime)]
        if parts[at + 1] != "files":
            raise FileNotFoundError(join(parts))
        return self._files(resource.ref, experiment.mtime, parts[at + 2 :])

    @staticmethod
    def _folder(name: str, parent: Entry, mtime: float | None = None) -> Entry:
        return Entry(name, True, mtime=parent.mtime if mtime is None else mtime, key=f"{parent.key}/{name}")

    def _projects(self) -> list[Entry]:
        rows = self._rows("/data/projects", "ID,secondary_ID,name,insert_date")
        return self._entries(rows, "ID", lambda r: f"project:{r.get('ID')}", ProjectRef.from_row)

    def _subjects(self, project: str) -> list[Entry]:
        rows = self._rows(f"/data/projects/{quote_part(project)}/subjects", "ID,label,insert_date")
        return self._entries(rows, "label", lambda r: f"subject:{r.get('ID')}", SubjectRef.from_row)

    def _experiments(self, project: str, subject: Entry) -> list[Entry]:
        bulk = self._raw(f"\0experiments\0{project}")
        if bulk is not None:
            rows = [r for r in bulk if str(r.get("subject_ID") or "") == subject.ref.id]
        else:
            rows = self._rows(
                f"/data/projects/{quote_part(project)}/subjects/{quote_part(subject.ref.id)}/experiments",
                "ID,label,date,insert_date,xsiType",
            )
        return self._entries(
            rows, "label", lambda r: f"experiment:{r.get('ID')}", lambda r: ExperimentRef.from_row(r, project=project)
        )

    def _scans(self, experiment: Entry) -> list[Entry]:
        eid = experiment.ref.id
        rows = self._rows(f"/data/experiments/{quote_part(eid)}/scans", "ID,type,series_description")
        for row in rows:
            row["folder"] = scan_folder(str(row.get("ID", "")), row.get("type"))
        return self._entries(rows, "folder", lambda r: f"scan:{eid}/{r.get('ID')}", ScanRef.from_row, experiment.mtime)

    def _resources(self, experiment: Entry, scan: ScanRef | None) -> list[Entry]:
        ref: ExperimentRef = experiment.ref
        scan_id = None if scan is None else scan.id
        bulk = self._raw(f"\0resources\0{ref.id}")
        if bulk is not None:
            if scan_id is None:
                rows = [dict(r) for r in bulk if r.get("category") == "resources"]
            else:
                rows = [dict(r) for r in bulk if r.get("category") == "scans" and str(r.get("cat_id")) == scan_id]
        else:
            path = f"/data/experiments/{quote_part(ref.id)}"
            if scan_id is not None:
                path += f"/scans/{quote_part(scan_id)}"
            rows = self._rows(path + "/resources")
        rows = [r for r in rows if r.get("xnat_abstractresource_id")]
        for row, name in zip(rows, resource_names(rows)):
            row["folder"] = name

        def resource(row: dict[str, str]) -> Resource:
            label, rid = str(row.get("label") or ""), str(row["xnat_abstractresource_id"])
            return Resource(ref.project, ref.id, scan_id, label, rid, ref.label, "" if scan is None else scan.type)

        key = lambda r: f"resource:{r.get('xnat_abstractresource_id')}"  # noqa: E731
        return self._entries(rows, "folder", key, resource, experiment.mtime)

    def _files(self, resource: Resource, mtime: float, folder: list[str]) -> list[Entry]:
        """List one folder of a resource, from the resource's (cached) files listing."""
        node = self._file_listing(resource).tree
        for name in folder:
            child = node.get(name)
            if not isinstance(child, dict):
                raise FileNotFoundError("/".join(folder))
            node = child
        prefix = "/".join(folder)
        entries = []
        for name, child in node.items():
            if isinstance(child, dict):
                entries.append(Entry(name, True, mtime=mtime, key=f"{resource.api_path}/{prefix}/{name}"))
            else:
                # With the digest, changed content is a new file to the mount (its open files, st_ino).
                key = f"{resource.api_path}:{child.server_path}:{child.digest or child.size}"
                entries.append(Entry(name, False, child.size, mtime + version_fraction(child), key, child))
        return entries

    def _file_listing(self, resource: Resource) -> FileListing:
        """Return the resource's files listing: from the session's bulk files listing, or (when the
        server refused that) from the resource's own listing. Cached like folder listings; when the
        server cannot be reached, the last listing is used: cached files stay readable."""
        rows: Any = None
        if resource.resource_id:
            bulk = self._raw(f"\0files\0{resource.experiment_id}")
            if bulk is not None:
                rows = bulk.get(resource.resource_id, [])
        if rows is None:
            rows = self._raw(f"\0resource-files\0{resource.api_path}")
        with self._lock:
            memo = self._file_listings.get(resource.api_path)
        if memo is not None and memo[0] is rows:
            return memo[1]
        listing = file_listing(resource, rows)
        with self._lock:
            self._file_listings[resource.api_path] = (rows, listing)
        return listing

    def _entries(
        self,
        rows: list[dict[str, str]],
        name_field: str,
        key: Callable[[dict], str],
        ref: Callable[[dict], Any],
        mtime: float | None = None,
    ) -> list[Entry]:
        """Turn listing rows into folder entries with safe, unique names and ``ref(row)`` as refs."""
        rows = sorted((r for r in rows if r.get(name_field)), key=lambda r: str(r[name_field]))
        names = unique_names(str(r[name_field]) for r in rows)
        entries = []
        for name, row in zip(names, rows):
            when = mtime if mtime is not None else parse_date(row.get("insert_date") or row.get("date"))
            entries.append(Entry(name, True, mtime=when or self.started, key=key(row), ref=ref(row)))
        return entries

    # -- metadata and units of download (xattrs, prefetch) -----------------------------------

    def metadata(self, path: str) -> dict[str, str]:
        """Return what the listings say about ``path``: ``xnat.uri`` (its REST path, as XNAT's
        listings give URIs), ``xnat.id`` and, by level, ``xnat.label``, ``xnat.xsiType``,
        ``xnat.date``, ``xnat.type``, ``xnat.series_description``, ``xnat.digest``, ``xnat.format``.
        Folders that are no server object (``scans``, ``resources``, ``files`` and below) say
        nothing. Never downloads content. Raises FileNotFoundError."""
        entry = self.stat(path)
        ref = entry.ref
        if normpath(path) == "/":
            return {"xnatfs.source": self.server_url}
        found: dict[str, str] = {}
        if isinstance(ref, ProjectRef):
            found = {"xnat.uri": f"/data/projects/{quote_part(ref.id)}", "xnat.id": ref.id}
            found.update({"xnat.name": ref.name, "xnat.secondary_ID": ref.secondary_id})
        elif isinstance(ref, SubjectRef):
            project = quote_part(normpath(path).strip("/").split("/")[0])
            found = {"xnat.uri": f"/data/projects/{project}/subjects/{quote_part(ref.id)}", "xnat.id": ref.id}
            found["xnat.label"] = ref.label
        elif isinstance(ref, ExperimentRef):
            found = {"xnat.uri": f"/data/experiments/{quote_part(ref.id)}", "xnat.id": ref.id, "xnat.label": ref.label}
            found.update({"xnat.xsiType": ref.xsi_type, "xnat.date": ref.date})
        elif isinstance(ref, ScanRef):
            experiment = self.stat(join(normpath(path).strip("/").split("/")[:3])).ref
            found = {"xnat.uri": f"/data/experiments/{quote_part(experiment.id)}/scans/{quote_part(ref.id)}"}
            found.update({"xnat.id": ref.id, "xnat.type": ref.type, "xnat.series_description": ref.series_description})
        elif isinstance(ref, Resource):
            found = {"xnat.uri": ref.api_path, "xnat.id": ref.resource_id, "xnat.label": ref.label}
        elif isinstance(ref, RemoteFile):
            quoted = "/".join(quote_part(p) for p in ref.server_path.split("/"))
            found = {"xnat.uri": f"{ref.resource.api_path}/files/{quoted}", "xnat.digest": ref.digest}
        return {name: str(value) for name, value in found.items() if value not in (None, "")}
