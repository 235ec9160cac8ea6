"""The XNAT transport: an XNAT archive as a tree of folders, scan resources fetched as ZIPs.

Tree (the layout XNAT uses inside its own downloads, below the experiment folder)::

    /{project ID}/{subject label}/{experiment label}/scans/{scan ID}-{type}/resources/{label}/files/{path}
    /{project ID}/{subject label}/{experiment label}/resources/{label}/files/{path}

Every folder comes from one JSON listing; a resource's ``files`` folder and all its sub-folders
come from one files listing. The first read of a file downloads its whole resource as one ZIP and
extracts it, as it arrives, into the cache; the reader gets its file as soon as it is complete.
"""

from __future__ import annotations

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
from urllib.parse import urlsplit, urlunsplit

from xnatfs import __version__
from xnatfs.cache import Cache, Filler
from xnatfs.exceptions import NotFoundError, ServerError, UploadError, XnatfsError
from xnatfs.extract import ExtractLimits, StreamingExtractor
from xnatfs.names import safe_relpath, scan_folder, unique_names
from xnatfs.session import XnatSession, quote_part
from xnatfs.transports.base import AbstractTransport, Entry

log = logging.getLogger(__name__)

# The path of a file inside an XNAT ZIP, after its resource's "files" folder.
_ZIP_MEMBER = re.compile(r"^[^/]+/(?:scans/[^/]+/|assessors/[^/]+/out/)?resources/[^/]+/files/(.+)$")


@dataclass(frozen=True)
class Resource:
    """Where a resource lives on the server: enough to list, download and upload it."""

    project: str
    experiment_id: str
    scan_id: str | None  # None for a session resource
    label: str
    resource_id: str = ""

    @property
    def api_path(self) -> str:
        """Return the resource's REST path, e.g. ``/data/experiments/E1/scans/2/resources/DICOM``."""
        base = f"/data/experiments/{quote_part(self.experiment_id)}"
        if self.scan_id is not None:
            base += f"/scans/{quote_part(self.scan_id)}"
        return f"{base}/resources/{quote_part(self.label)}"


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

    def __init__(
        self,
        netloc: str | None = None,
        root: str | None = None,
        mode: str = "r",
        read_directory_only: bool = False,
        opts: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(netloc, root, mode, read_directory_only, opts)
        self.server_url = server_url(self.opts.get("url"), netloc, root)
        self.timeout = float(self.opts.get("timeout", 30))
        self.session: XnatSession = self.opts.get("session") or XnatSession(
            self.server_url,
            self.opts.get("user"),
            self.opts.get("password"),
            timeout=self.timeout,
            verify=self.opts.get("verify", True),
        )
        self.cache: Cache = self.opts.get("cache") or Cache(self.opts.get("cache_dir"), self.opts.get("cache_size"))
        self.limits: ExtractLimits = self.opts.get("extract_limits") or ExtractLimits()
        self.started = time.time()
        self.downloads = 0  # ZIP downloads started by this transport

    def close(self) -> None:
        self.session.close()

    # -- listings -------------------------------------------------------------------------

    def _list(self, path: str) -> list[Entry]:
        parts = [] if path == "/" else path.strip("/").split("/")
        if len(parts) == 0:
            return self._projects()
        if len(parts) == 1:
            return self._subjects(parts[0])
        if len(parts) == 2:
            return self._experiments(parts[0], self.stat(path))
        experiment = self.stat(_join(parts[:3]))
        if len(parts) == 3:
            return [self._folder("scans", experiment), self._folder("resources", experiment)]
        if parts[3] == "scans":
            if len(parts) == 4:
                return self._scans(experiment)
            scan = self.stat(_join(parts[:5]))
            if len(parts) == 5:
                return [self._folder("resources", scan, experiment.mtime)]
            if parts[5] != "resources":
                raise FileNotFoundError(path)
            return self._resource_level(parts, 6, experiment, scan.ref["ID"])
        if parts[3] == "resources":
            return self._resource_level(parts, 4, experiment, None)
        raise FileNotFoundError(path)

    def _resource_level(self, parts: list[str], at: int, experiment: Entry, scan_id: str | None) -> list[Entry]:
        """List ``.../resources`` (``parts[at]`` absent), ``.../resources/{label}`` or below ``files``."""
        if len(parts) == at:
            return self._resources(experiment, scan_id)
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
        rows = self.session.get_rows("/data/projects", "ID,secondary_ID,name,insert_date")
        return self._entries(rows, "ID", lambda r: f"project:{r.get('ID')}")

    def _subjects(self, project: str) -> list[Entry]:
        rows = self.session.get_rows(f"/data/projects/{quote_part(project)}/subjects", "ID,label,insert_date")
        return self._entries(rows, "label", lambda r: f"subject:{r.get('ID')}")

    def _experiments(self, project: str, subject: Entry) -> list[Entry]:
        rows = self.session.get_rows(
            f"/data/projects/{quote_part(project)}/subjects/{quote_part(subject.ref['ID'])}/experiments",
            "ID,label,date,insert_date,xsiType",
        )
        for row in rows:
            row["project"] = project
        return self._entries(rows, "label", lambda r: f"experiment:{r.get('ID')}")

    def _scans(self, experiment: Entry) -> list[Entry]:
        eid = experiment.ref["ID"]
        rows = self.session.get_rows(f"/data/experiments/{quote_part(eid)}/scans", "ID,type,series_description")
        for row in rows:
            row["folder"] = scan_folder(str(row.get("ID", "")), row.get("type"))
        return self._entries(rows, "folder", lambda r: f"scan:{eid}/{r.get('ID')}", experiment.mtime)

    def _resources(self, experiment: Entry, scan_id: str | None) -> list[Entry]:
        eid = experiment.ref["ID"]
        path = f"/data/experiments/{quote_part(eid)}"
        if scan_id is not None:
            path += f"/scans/{quote_part(scan_id)}"
        rows = self.session.get_rows(path + "/resources")
        entries = self._entries(
            rows, "label", lambda r: f"resource:{r.get('xnat_abstractresource_id')}", experiment.mtime
        )
        project = str(experiment.ref.get("project", ""))
        return [
            Entry(
                e.name,
                True,
                mtime=e.mtime,
                key=e.key,
                ref=Resource(
                    project, eid, scan_id, str(e.ref["label"]), str(e.ref.get("xnat_abstractresource_id", ""))
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
        """Return the resource's files listing (one request, cached like a folder listing).

        When the server cannot be reached, the last listing is used: cached files stay readable.
        """
        key = f"\0files:{resource.api_path}"
        with self._lock:
            cached = self._fresh.get(key)
        if cached is not None:
            return cached
        try:
            rows = self.session.get_rows(resource.api_path + "/files")
        except (NotFoundError, PermissionError):
            raise
        except XnatfsError as error:
            with self._lock:
                stale = self._last.get(key)
            if stale is None:
                raise
            log.warning("%s: using the last files listing, the server failed: %s", resource.api_path, error)
            return stale
        listing = file_listing(resource, rows)
        with self._lock:
            self._fresh[key] = listing
            self._last[key] = listing
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

    def _fetch(self, path: str, entry: Entry) -> str:
        remote = entry.ref
        if not isinstance(remote, RemoteFile):
            raise IsADirectoryError(path)
        resource = remote.resource
        listing = self._file_listing(resource)
        key = (
            "xnat",
            self.server_url,
            resource.project,
            resource.experiment_id,
            resource.scan_id or "",
            resource.label,
        )

        def fill(filler: Filler) -> None:
            self._download_resource(resource, listing, filler)

        return self.cache.entry(key, listing.version).get(remote.cache_path, fill, timeout=self.timeout)

    def _unit_of(self, path: str, entry: Entry) -> tuple[str, str] | None:
        """A resource's ``files`` folder is one download; an experiment's resources are read together."""
        parts = path.strip("/").split("/")
        at = 7 if len(parts) > 8 and parts[3] == "scans" else 5 if len(parts) > 6 and parts[3] == "resources" else 0
        if not at or parts[at] != "files" or not isinstance(entry.ref, RemoteFile):
            return None
        return _join(parts[: at + 1]), _join(parts[:3])

    def _download_resource(self, resource: Resource, listing: FileListing, filler: Filler) -> None:
        """Download ``resource`` as one ZIP and extract it into ``filler.staging`` as it arrives."""
        self.downloads += 1
        log.info("downloading %s as ZIP (%d files)", resource.api_path, len(listing.files))

        def map_name(name: str) -> str | None:
            match = _ZIP_MEMBER.match(name)
            if match is None:
                log.warning("%s: unexpected ZIP entry %r skipped", resource.api_path, name)
                return None
            remote = listing.files.get(match.group(1))
            return remote.cache_path if remote is not None else safe_relpath(match.group(1))

        extractor = StreamingExtractor(filler.staging, self.limits, map_name=map_name, on_member=filler.publish)
        try:
            with self.session.stream(resource.api_path + "/files", format="zip") as chunks:
                for chunk in chunks:
                    extractor.feed(chunk)
                    filler.progress()
            extractor.finish()
        except BaseException as error:
            extractor.fail(error)
            raise

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
        experiment = self.stat(_join(parts[:3]))
        resource = Resource(str(experiment.ref.get("project", "")), experiment.ref["ID"], scan_id, label)
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
        url = f"{resource.api_path}/files/{'/'.join(quote_part(p) for p in server_path.split('/'))}"
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
        if remote is None:
            raise ServerError(f"{url}: the uploaded file is missing from the server's listing")
        if remote.size != size or (remote.digest and remote.digest != md5.hexdigest()):
            raise ServerError(f"{url}: the upload arrived damaged (server has {remote.size} of {size} bytes)")
        with self._lock:
            self._fresh.pop(f"\0files:{resource.api_path}", None)


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
                self._transport.invalidate(posixpath.dirname(self._path))
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
    return FileListing(files, tree, version)


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
