"""Typed references to XNAT objects, carried in :attr:`Entry.ref <xnatfs.transports.entry.Entry.ref>`,
and a resource's files listing; their JSON form for the catalog."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from xnatfs.client import quote_part
from xnatfs.names import safe_relpath, scan_folder

# Experiment types that have scans; others (subject assessors such as xnat:subjectVariablesData) do not.
_IMAGE_SESSION_SUFFIX = "SessionData"


_R = TypeVar("_R", bound="_RowRef")


@dataclass(frozen=True)
class _RowRef:
    """An XNAT object read from its listing row: its ``ID``, and a field per column of the same name
    (``COLUMNS`` names the columns spelled otherwise)."""

    COLUMNS: ClassVar[dict[str, str]] = {}
    id: str

    @classmethod
    def from_row(cls: type[_R], row: dict[str, Any], **given: str) -> _R:
        """Return the reference of ``row`` (a missing or empty column reads as ``""``); ``given``: the
        fields the row does not hold."""
        columns = _columns(cls)
        return cls(**{f: str(row.get(c) or "") for f, c in columns.items() if f not in given}, **given)


@functools.cache
def _columns(cls: type[_RowRef]) -> dict[str, str]:
    """Return the column of each field of ``cls``."""
    return {f.name: {"id": "ID", **cls.COLUMNS}.get(f.name, f.name) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class ProjectRef(_RowRef):
    """A project, from its row in ``/data/projects``."""

    COLUMNS: ClassVar[dict[str, str]] = {"secondary_id": "secondary_ID"}
    name: str = ""
    secondary_id: str = ""


@dataclass(frozen=True)
class SubjectRef(_RowRef):
    """A subject, from its row in ``/data/projects/{P}/subjects``."""

    label: str = ""


@dataclass(frozen=True)
class ExperimentRef(_RowRef):
    """An experiment (imaging session or subject assessor) of ``project`` (given), from its listing row."""

    COLUMNS: ClassVar[dict[str, str]] = {"xsi_type": "xsiType"}
    label: str = ""
    project: str = ""
    xsi_type: str = ""
    date: str = ""

    @property
    def has_scans(self) -> bool:
        """Return True for an imaging session (the only experiments with scans)."""
        return (self.xsi_type or _IMAGE_SESSION_SUFFIX).endswith(_IMAGE_SESSION_SUFFIX)


@dataclass(frozen=True)
class ScanRef(_RowRef):
    """A scan of an experiment, from its row in ``/data/experiments/{E}/scans``."""

    type: str = ""
    series_description: str = ""


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

    @functools.cached_property
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


# Catalog tags of the references kept whole (a RemoteFile is kept as a list, see encode_ref).
_TAGS: dict[str, type] = {
    "$project": ProjectRef,
    "$subject": SubjectRef,
    "$experiment": ExperimentRef,
    "$scan": ScanRef,
    "$resource": Resource,
}


def encode_ref(ref: Any) -> Any:
    """Return a reference as plain JSON data for the catalog (other values as they are)."""
    if isinstance(ref, RemoteFile):
        return {"$file": [dataclasses.asdict(ref.resource), ref.server_path, ref.cache_path, ref.size, ref.digest]}
    for tag, cls in _TAGS.items():
        if type(ref) is cls:
            return {tag: dataclasses.asdict(ref)}
    return ref


def decode_ref(data: Any) -> Any:
    """Return the reference :func:`encode_ref` turned into ``data``.

    Raises ValueError for a listing row of an older catalog (rows are references now: that
    listing is fetched anew), TypeError or KeyError for data that is no reference.
    """
    if isinstance(data, dict) and len(data) == 1:
        ((tag, value),) = data.items()
        if tag == "$file":
            resource, server_path, cache_path, size, digest = value
            return RemoteFile(Resource(**resource), str(server_path), str(cache_path), int(size), str(digest))
        if tag in _TAGS:
            return _TAGS[tag](**value)
    if isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
        raise ValueError("a listing row of an older catalog")
    return data
