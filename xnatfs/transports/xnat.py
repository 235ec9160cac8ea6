"""The XNAT transport: an XNAT archive as a tree of folders, scan resources fetched as ZIPs.

Tree (the layout XNAT uses inside its own downloads, below the experiment folder)::

    /{project ID}/{subject label}/{experiment label}/scans/{scan ID}-{type}/resources/{label}/files/{path}
    /{project ID}/{subject label}/{experiment label}/resources/{label}/files/{path}

Every folder comes from one JSON listing; a resource's ``files`` folder and all its sub-folders
come from one files listing. The first read of a file downloads its whole resource as one ZIP and
extracts it, as it arrives, into the cache; the reader gets its file as soon as it is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

from cachetools import LRUCache

from xnatfs import __version__
from xnatfs.cache import Filler
from xnatfs.exceptions import ConnectionFailedError, NotFoundError, ServerError, UploadError, XnatfsError
from xnatfs.extract import ExtractLimits, StreamingExtractor
from xnatfs.names import safe_relpath, scan_folder, unique_names
from xnatfs.session import XnatSession, quote_part
from xnatfs.transports.base import AbstractTransport, Entry, Unit

log = logging.getLogger(__name__)

# The path of a file inside an XNAT ZIP, after its resource's "files" folder.
_ZIP_MEMBER = re.compile(r"^[^/]+/(?:scans/[^/]+/|assessors/[^/]+/out/)?resources/[^/]+/files/(.+)$")
# Characters XNAT takes literally in a file path (RFC 3986 path characters other than "%").
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
# Experiment types that have scans; others (subject assessors such as xnat:subjectVariablesData) do not.
_IMAGE_SESSION_SUFFIX = "SessionData"


@dataclass(frozen=True)
class Resource:
    """Where a resource lives on the server: enough to list, download and upload it.

    ``resource_id`` is XNAT's ``xnat_abstractresource_id``; URLs use it, never the label (XNAT
    matches the label as sent, without percent-decoding, and several resources may share one).
    A resource not created yet has no ID and is addressed by its label.
    """

    project: str
    experiment_id: str
    scan_id: str | None  # None for a session resource
    label: str
    resource_id: str = ""
    experiment_label: str = ""
    scan_type: str = ""

    @property
    def api_path(self) -> str:
        """Return the resource's REST path, e.g. ``/data/experiments/E1/scans/2/resources/12345``."""
        base = f"/data/experiments/{quote_part(self.experiment_id)}"
        if self.scan_id is not None:
            base += f"/scans/{quote_part(self.scan_id)}"
        return f"{base}/resources/{quote_part(self.resource_id or self.label)}"

    def zip_name(self, server_path: str) -> str:
        """Return the path XNAT gives a file below ``files/`` in this resource's ZIP.

        XNAT rewrites entry names: the experiment ID anywhere (file names included) becomes the
        experiment label, a folder named like the scan ID becomes ``{ID}-{type}``, and one named
        like the resource ID becomes the label.
        """
        path = server_path
        if self.experiment_id and self.experiment_label:
            path = path.replace(self.experiment_id, self.experiment_label)
        *folders, name = path.split("/")
        for index, folder in enumerate(folders):
            if self.scan_id is not None and folder == self.scan_id:
                folders[index] = scan_folder(self.scan_id, self.scan_type)
            elif self.resource_id and folder == self.resource_id and self.label:
                folders[index] = self.label
        return "/".join([*folders, name])


def file_url_path(server_path: str) -> str:
    """Return ``server_path`` as XNAT needs it after ``files/`` to mean exactly that stored name.

    XNAT takes the path as sent unless it contains ``%20`` or ``%2B``; then it URL-decodes all of it
    (``+`` as a space). A path of plain URL characters goes as it is (``a(1).nii``); one with a space
    or a ``+`` and anything else is encoded completely. Raises ValueError for a name XNAT cannot be
    told (characters that need encoding, but neither a space nor a ``+`` to make XNAT decode).
    """
    if all(c.isascii() and (c.isalnum() or c in _PATH_SAFE) for c in server_path):
        return server_path
    encoded = quote(server_path, safe="/")
    if "%20" in encoded or "%2B" in encoded:
        return encoded
    raise ValueError(f"{server_path!r}: XNAT cannot store or serve this name through its REST API")


@dataclass(frozen=True)
class RemoteFile:
    """A file of a resource: its path inside the resource on the server and in the cache."""

    resource: Resource
    server_path: str
    cache_path: str
    size: int
    digest: str


@dataclass(frozen=True)
class FileListing:
    """One resource's files listing: by server path, as a folder tree, and its version."""

    files: dict[str, RemoteFile]
    tree: dict[str, Any]
    version: str
    size: int  # of all files, as listed


class XnatTransport(AbstractTransport):
    """An XNAT server (``http://``, ``https://``, ``xnat://`` = https), read and write.

    Options: ``user``, ``password`` (or an alias token and its secret), ``timeout`` (seconds,
    default 30), ``cache`` (a :class:`~xnatfs.cache.Cache`) or ``cache_dir`` and ``cache_size``,
    ``ttl``, ``verify`` (TLS verification, default True), ``extract_limits``
    (:class:`~xnatfs.extract.ExtractLimits`), ``session`` (an existing XnatSession).
    """

    name = "xnat"
    description = "XNAT imaging archive over its REST API; scan resources fetched as ZIPs into the cache."
    authors = "xnatfs developers"
    version = __version__
    url = "https://xnat.org"
    schemes = ["http", "https", "xnat"]

    def _setup(self) -> None:
        self.server_url = server_url(self.opts.get("url"), self.netloc, self.root)
        self.session: XnatSession = self.opts.get("session") or XnatSession(
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

    def _check_source(self) -> None:
        self.session.login()  # bad credentials or a dead server show here, even with a fresh catalog
        self.listdir("/")

    # -- catalog refs ---------------------------------------------------------------------

    def _encode_ref(self, ref: Any) -> Any:
        if isinstance(ref, RemoteFile):
            return {"$file": [dataclasses.asdict(ref.resource), ref.server_path, ref.cache_path, ref.size, ref.digest]}
        if isinstance(ref, Resource):
            return {"$resource": dataclasses.asdict(ref)}
        return super()._encode_ref(ref)

    def _decode_ref(self, data: Any) -> Any:
        if isinstance(data, dict) and "$file" in data:
            resource, server_path, cache_path, size, digest = data["$file"]
            return RemoteFile(Resource(**resource), str(server_path), str(cache_path), int(size), str(digest))
        if isinstance(data, dict) and "$resource" in data:
            return Resource(**data["$resource"])
        return data

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
        experiment = self.stat(_join(parts[:3]))
        if len(parts) == 3:
            if not str(experiment.ref.get("xsiType") or _IMAGE_SESSION_SUFFIX).endswith(_IMAGE_SESSION_SUFFIX):
                return [self._folder("resources", experiment)]  # e.g. xnat:subjectVariablesData: no scans
            return [self._folder("scans", experiment), self._folder("resources", experiment)]
        if parts[3] == "scans":
            if len(parts) == 4:
                try:
                    return self._scans(experiment)
                except NotFoundError:
                    return []  # XNAT answers 404 for experiments without scans (subject assessors)
            scan = self.stat(_join(parts[:5]))
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
            eid = entry.ref.get("ID") if isinstance(entry.ref, dict) else None
            if not eid:
                continue
            if str(entry.ref.get("xsiType") or _IMAGE_SESSION_SUFFIX).endswith(_IMAGE_SESSION_SUFFIX):
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

    def _resource_level(self, parts: list[str], at: int, experiment: Entry, scan: dict | None) -> list[Entry]:
        """List ``.../resources`` (``parts[at]`` absent), ``.../resources/{label}`` or below ``files``."""
        if len(parts) == at:
            return self._resources(experiment, scan)
        resource = self.stat(_join(parts[: at + 1]))
        if len(parts) == at + 1:
            return [self._folder("files", resource, experiment.mtime)]
        if parts[at + 1] != "files":
            raise FileNotFoundError(_join(parts))
        return self._files(resource.ref, experiment.mtime, parts[at + 2 :])

    @staticmethod
    def _folder(name: str, parent: Entry, mtime: float | None = None) -> Entry:
        return Entry(name, True, mtime=parent.mtime if mtime is None else mtime, key=f"{parent.key}/{name}")

    def _projects(self) -> list[Entry]:
        rows = self._rows("/data/projects", "ID,secondary_ID,name,insert_date")
        return self._entries(rows, "ID", lambda r: f"project:{r.get('ID')}")

    def _subjects(self, project: str) -> list[Entry]:
        rows = self._rows(f"/data/projects/{quote_part(project)}/subjects", "ID,label,insert_date")
        return self._entries(rows, "label", lambda r: f"subject:{r.get('ID')}")

    def _experiments(self, project: str, subject: Entry) -> list[Entry]:
        bulk = self._raw(f"\0experiments\0{project}")
        if bulk is not None:
            rows = [dict(r) for r in bulk if str(r.get("subject_ID") or "") == str(subject.ref.get("ID") or "")]
        else:
            rows = self._rows(
                f"/data/projects/{quote_part(project)}/subjects/{quote_part(subject.ref['ID'])}/experiments",
                "ID,label,date,insert_date,xsiType",
            )
        for row in rows:
            row["project"] = project
        return self._entries(rows, "label", lambda r: f"experiment:{r.get('ID')}")

    def _scans(self, experiment: Entry) -> list[Entry]:
        eid = experiment.ref["ID"]
        rows = self._rows(f"/data/experiments/{quote_part(eid)}/scans", "ID,type,series_description")
        for row in rows:
            row["folder"] = scan_folder(str(row.get("ID", "")), row.get("type"))
        return self._entries(rows, "folder", lambda r: f"scan:{eid}/{r.get('ID')}", experiment.mtime)

    def _resources(self, experiment: Entry, scan: dict | None) -> list[Entry]:
        eid = experiment.ref["ID"]
        scan_id = None if scan is None else str(scan.get("ID", ""))
        bulk = self._raw(f"\0resources\0{eid}")
        if bulk is not None:
            if scan_id is None:
                rows = [dict(r) for r in bulk if r.get("category") == "resources"]
            else:
                rows = [dict(r) for r in bulk if r.get("category") == "scans" and str(r.get("cat_id")) == scan_id]
        else:
            path = f"/data/experiments/{quote_part(eid)}"
            if scan_id is not None:
                path += f"/scans/{quote_part(scan_id)}"
            rows = self._rows(path + "/resources")
        rows = [r for r in rows if r.get("xnat_abstractresource_id")]
        for row, name in zip(rows, resource_names(rows)):
            row["folder"] = name
        entries = self._entries(
            rows, "folder", lambda r: f"resource:{r.get('xnat_abstractresource_id')}", experiment.mtime
        )
        project = str(experiment.ref.get("project", ""))
        return [
            Entry(
                e.name,
                True,
                mtime=e.mtime,
                key=e.key,
                ref=Resource(
                    project,
                    eid,
                    scan_id,
                    str(e.ref.get("label") or ""),
                    str(e.ref["xnat_abstractresource_id"]),
                    str(experiment.ref.get("label") or ""),
                    "" if scan is None else str(scan.get("type") or ""),
                ),
            )
            for e in entries
        ]

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
                # With the digest, changed content is a new file to the open-file memos and st_ino.
                key = f"{resource.api_path}:{child.server_path}:{child.digest or child.size}"
                entries.append(Entry(name, False, child.size, mtime + _version_fraction(child), key, child))
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
        mtime: float | None = None,
    ) -> list[Entry]:
        """Turn listing rows into folder entries with safe, unique names."""
        rows = sorted((r for r in rows if r.get(name_field)), key=lambda r: str(r[name_field]))
        names = unique_names(str(r[name_field]) for r in rows)
        entries = []
        for name, row in zip(names, rows):
            when = mtime if mtime is not None else parse_date(row.get("insert_date") or row.get("date"))
            entries.append(Entry(name, True, mtime=when or self.started, key=key(row), ref=row))
        return entries

    # -- content --------------------------------------------------------------------------

    def _unit(self, path: str, entry: Entry) -> Unit | None:
        """A file's unit is its resource (one ZIP); an experiment's resources are read together."""
        remote = entry.ref
        if not isinstance(remote, RemoteFile):
            return None
        resource = remote.resource
        listing = self._file_listing(resource)
        parts = path.strip("/").split("/")
        key = ("xnat", self.server_url, resource.project, resource.experiment_id, resource.scan_id or "")
        return Unit(
            key=(*key, resource.resource_id or resource.label),
            version=listing.version,
            member=remote.cache_path,
            id=resource.api_path,
            folder=_join(parts[: 7 if parts[3] == "scans" else 5]),  # the resource's folder
            group=_join(parts[:3]),
            size=listing.size,
            ref=(resource, listing),
        )

    def _fill(self, unit: Unit, filler: Filler) -> None:
        self._download_resource(*unit.ref, filler)

    def _download_resource(self, resource: Resource, listing: FileListing, filler: Filler) -> None:
        """Download ``resource`` as one ZIP and extract it into ``filler.staging`` as it arrives.

        ZIP entries are mapped back to listed files by XNAT's renaming rules (see
        :meth:`Resource.zip_name`); entries that match no listed file are skipped, and listed files
        the ZIP did not bring (a name the rules leave ambiguous) are downloaded one by one.
        """
        if self.offline:
            raise ConnectionFailedError(f"{resource.api_path}: not in the cache, and the mount is offline")
        self.check_not_down(resource.api_path)
        self.downloads += 1
        log.info("downloading %s as ZIP (%d files)", resource.api_path, len(listing.files))
        by_zip_name = zip_names(resource, listing)
        received: set[str] = set()

        def map_name(name: str) -> str | None:
            match = _ZIP_MEMBER.match(name)
            cache_path = by_zip_name.get(match.group(1)) if match else None
            if cache_path is None or cache_path in received:
                log.warning("%s: ZIP entry %r matches no listed file; skipped", resource.api_path, name)
                return None
            received.add(cache_path)
            return cache_path

        extractor = StreamingExtractor(filler.staging, self.limits, map_name=map_name, on_member=filler.publish)
        answered = False
        try:
            # compression=0 overrides a site that deflates ZIPs: stored entries stream, and cost no CPU.
            with self.session.stream(resource.api_path + "/files", format="zip", compression="0") as chunks:
                answered = True
                self._down_until = 0.0
                for chunk in chunks:
                    extractor.feed(chunk)
                    filler.progress()
            extractor.finish()
        except BaseException as error:
            if isinstance(error, ConnectionFailedError) and not answered:
                self.source_down()  # unreachable: other reads fail at once for a few seconds
            extractor.fail(error)
            raise
        for remote in listing.files.values():
            if remote.cache_path not in received:
                self._download_one(remote, filler)

    def _download_one(self, remote: RemoteFile, filler: Filler) -> None:
        """Download one listed file by itself into the staging folder (when the ZIP lacked it)."""
        try:
            url = f"{remote.resource.api_path}/files/{file_url_path(remote.server_path)}"
        except ValueError as error:
            log.warning("%s: %s", remote.resource.api_path, error)
            return
        try:
            with self.session.stream(url) as chunks:
                filler.write(remote.cache_path, chunks)
        except NotFoundError:
            log.warning("%s: listed but not on the server", url)

    # -- metadata and units of download (xattrs, prefetch) -----------------------------------

    def metadata(self, path: str) -> dict[str, str]:
        """Return what the listings say about ``path``: ``xnat.uri`` (its REST path, as XNAT's
        listings give URIs), ``xnat.id`` and, by level, ``xnat.label``, ``xnat.xsiType``,
        ``xnat.date``, ``xnat.type``, ``xnat.series_description``, ``xnat.digest``, ``xnat.format``.
        Folders that are no server object (``scans``, ``resources``, ``files`` and below) say
        nothing. Never downloads content. Raises FileNotFoundError."""
        entry = self.stat(path)
        parts = [] if path.strip("/") == "" else path.strip("/").split("/")
        row = entry.ref if isinstance(entry.ref, dict) else {}
        found: dict[str, str] = {}
        if not parts:
            return {"xnatfs.source": self.server_url}
        if len(parts) == 1:
            found = {"xnat.uri": f"/data/projects/{quote_part(row.get('ID', parts[0]))}", "xnat.id": row.get("ID")}
            found.update({"xnat.name": row.get("name"), "xnat.secondary_ID": row.get("secondary_ID")})
        elif len(parts) == 2:
            project = quote_part(parts[0])
            found = {"xnat.uri": f"/data/projects/{project}/subjects/{quote_part(row.get('ID', ''))}"}
            found.update({"xnat.id": row.get("ID"), "xnat.label": row.get("label")})
        elif len(parts) == 3:
            found = {"xnat.uri": f"/data/experiments/{quote_part(row.get('ID', ''))}", "xnat.id": row.get("ID")}
            found.update({"xnat.label": row.get("label"), "xnat.xsiType": row.get("xsiType")})
            found["xnat.date"] = row.get("date")
        elif len(parts) == 5 and parts[3] == "scans":
            experiment = self.stat(_join(parts[:3])).ref
            found = {"xnat.uri": f"/data/experiments/{quote_part(experiment['ID'])}/scans/{quote_part(row['ID'])}"}
            found.update({"xnat.id": row.get("ID"), "xnat.type": row.get("type")})
            found["xnat.series_description"] = row.get("series_description")
        elif isinstance(entry.ref, Resource):
            resource = entry.ref
            found = {"xnat.uri": resource.api_path, "xnat.id": resource.resource_id, "xnat.label": resource.label}
        elif isinstance(entry.ref, RemoteFile):
            remote = entry.ref
            quoted = "/".join(quote_part(p) for p in remote.server_path.split("/"))
            found = {"xnat.uri": f"{remote.resource.api_path}/files/{quoted}", "xnat.digest": remote.digest}
        return {name: str(value) for name, value in found.items() if value not in (None, "")}

    # -- writing --------------------------------------------------------------------------

    def _open_write(self, path: str, mode: str) -> IO[bytes]:
        parts = path.strip("/").split("/")
        if len(parts) > 7 and parts[3] == "scans" and parts[5] == "resources" and parts[7] == "files":
            scan_id = self.stat(_join(parts[:5])).ref["ID"]
            label, rest = parts[6], parts[8:]
        elif len(parts) > 5 and parts[3] == "resources" and parts[5] == "files":
            scan_id, label, rest = None, parts[4], parts[6:]
        else:
            raise PermissionError(f"{path}: only files inside a resource's files folder can be written")
        if not rest:
            raise IsADirectoryError(path)
        folder = _join(parts[: 7 if scan_id is not None else 5])
        try:
            resource = self.stat(folder).ref  # an existing resource: addressed by its ID
        except FileNotFoundError:
            experiment = self.stat(_join(parts[:3]))
            resource = Resource(str(experiment.ref.get("project", "")), experiment.ref["ID"], scan_id, label)
        file_url_path("/".join(rest))  # refuses at open a name XNAT could not store
        return _Upload(self, resource, "/".join(rest), path, mode)

    def upload(self, resource: Resource, server_path: str, local_path: str) -> None:
        """Upload ``local_path`` as ``server_path`` of ``resource`` and check it arrived intact.

        Raises ServerError when the server's listing lacks the file or its size or digest differ.
        """
        size = os.path.getsize(local_path)
        md5 = hashlib.md5()
        with open(local_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
        url = f"{resource.api_path}/files/{file_url_path(server_path)}"
        with open(local_path, "rb") as body:
            self.session.request(
                "PUT",
                url,
                params={"overwrite": "true", "inbody": "true"},
                data=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            ).close()
        rows = self.session.get_rows(resource.api_path + "/files")
        remote = file_listing(resource, rows).files.get(server_path)
        eid = resource.experiment_id
        self._forget(f"\0files\0{eid}", f"\0resources\0{eid}", f"\0resource-files\0{resource.api_path}")
        if remote is None:
            raise ServerError(f"{url}: the uploaded file is missing from the server's listing")
        if remote.size != size or (remote.digest and remote.digest != md5.hexdigest()):
            raise ServerError(f"{url}: the upload arrived damaged (server has {remote.size} of {size} bytes)")


class _Upload(io.RawIOBase):
    """A local temporary file that is uploaded to XNAT when closed, and checked on arrival.

    Closing raises if the upload failed; leaving a ``with`` block by an exception discards the
    data instead of uploading something incomplete.
    """

    def __init__(self, transport: XnatTransport, resource: Resource, server_path: str, path: str, mode: str):
        super().__init__()
        if mode == "x" and transport.exists(path):
            raise FileExistsError(path)
        self._transport = transport
        self._resource = resource
        self._server_path = server_path
        self._path = path
        self._discard = False
        self._file = tempfile.NamedTemporaryFile(prefix="xnatfs-upload-", delete=False)
        if mode == "a" and transport.exists(path):
            with transport.open(path, "r") as existing:
                while block := existing.read(1 << 20):
                    self._file.write(block)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        return self._file.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            if not self._discard:
                try:
                    self._transport.upload(self._resource, self._server_path, self._file.name)
                except Exception as error:
                    # Keep the data: the caller may have nothing else to retry from.
                    kept = self._file.name
                    raise UploadError(
                        f"{self._path}: upload failed ({error}); the data is kept in {kept}", kept
                    ) from error
                # Every folder from the file up to the resource's "files" may have gained an entry.
                folder = posixpath.dirname(self._path)
                for _ in range(self._server_path.count("/") + 1):
                    self._transport.invalidate(folder)
                    folder = posixpath.dirname(folder)
            os.unlink(self._file.name)
        finally:
            super().close()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._discard = exc_type is not None
        self.close()


def file_listing(resource: Resource, rows: list[dict[str, str]]) -> FileListing:
    """Build a resource's FileListing from its files listing rows (safe, unique cache paths)."""
    paths = []
    for row in rows:
        uri = str(row.get("URI", ""))
        marker = uri.find("/files/")
        server_path = uri[marker + len("/files/") :] if marker >= 0 else str(row.get("Name", ""))
        if server_path:
            paths.append((server_path, row))
    files: dict[str, RemoteFile] = {}
    used: set[str] = set()
    for server_path, row in paths:
        cache_path = safe_relpath(server_path)
        if cache_path in used:  # two server names with one safe form
            cache_path += "~" + hashlib.sha1(server_path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        used.add(cache_path)
        try:
            size = int(row.get("Size") or 0)
        except ValueError:
            size = 0
        files[server_path] = RemoteFile(resource, server_path, cache_path, size, str(row.get("digest") or ""))
    tree: dict[str, Any] = {}
    for remote in files.values():
        node = tree
        *folders, name = remote.cache_path.split("/")
        for folder in folders:
            child = node.setdefault(folder, {})
            if not isinstance(child, dict):  # a file and a folder of one name: the file wins
                break
            node = child
        else:
            node.setdefault(name, remote)
    signature = "\n".join(f"{p}\0{f.size}\0{f.digest}" for p, f in sorted(files.items()))
    version = hashlib.sha256(signature.encode("utf-8", "surrogateescape")).hexdigest()
    return FileListing(files, tree, version, sum(f.size for f in files.values()))


def zip_names(resource: Resource, listing: FileListing) -> dict[str, str]:
    """Return {path below ``files/`` in the resource's ZIP: cache path} for the listed files.

    A ZIP name that two listed files would both get is left out (neither can be told from it).
    """
    found: dict[str, list[str]] = {}
    for remote in listing.files.values():
        found.setdefault(resource.zip_name(remote.server_path), []).append(remote.cache_path)
    return {name: paths[0] for name, paths in found.items() if len(paths) == 1}


def resource_names(rows: list[dict[str, str]]) -> list[str]:
    """Return a folder name for each resource row (same order), deterministic and unique.

    The label, except: a resource without a label is named by its ID; of several resources with
    one label, the one with the lowest ID keeps it and the others are ``{label}~{ID}``.
    """

    def id_key(row: dict[str, str]) -> tuple[int, str]:
        rid = str(row.get("xnat_abstractresource_id") or "")
        return (int(rid) if rid.isdigit() else 0, rid)

    names: dict[int, str] = {}
    taken: set[str] = set()
    for index, row in sorted(enumerate(rows), key=lambda pair: id_key(pair[1])):
        label = str(row.get("label") or "")
        rid = str(row.get("xnat_abstractresource_id") or "")
        name = label if label and label not in taken else f"{label}~{rid}" if label else rid
        taken.add(label)
        names[index] = name
    return [names[i] for i in range(len(rows))]


def parse_date(text: str | None) -> float | None:
    """Return epoch seconds of an XNAT date ("2024-01-31" or "2024-01-31 12:00:00.0"), or None."""
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), fmt).timestamp()
        except ValueError:
            continue
    return None


def server_url(url: str | None, netloc: str | None = None, root: str | None = None) -> str:
    """Return the HTTP(S) base URL of a source URL (``xnat://`` means https)."""
    if url:
        parts = urlsplit(url)
        scheme = "https" if parts.scheme == "xnat" else parts.scheme
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    if not netloc:
        raise XnatfsError("an XNAT transport needs a server address")
    return f"https://{netloc}{(root or '').rstrip('/')}"


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _version_fraction(file: RemoteFile) -> float:
    """Return a fraction of a second (1 µs to 1 s) derived from the file's digest, 0 without one.

    XNAT lists no date per file, so files get their session's date; this fraction makes the mtime
    change when the content changes, which is what makes the kernel drop cached pages of the old
    content (sizes alone miss a change of the same length).
    """
    if not file.digest:
        return 0.0
    return (int(hashlib.sha1(file.digest.encode()).hexdigest()[:8], 16) % 999_999 + 1) / 1e6
