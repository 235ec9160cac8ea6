"""The on-disk data model of the embedded server: an XNAT archive stored as plain folders.

The layout is documented in README-data.md. `Archive.index()` gives a snapshot of the folder tree
(projects down to resources, not the files); it is rebuilt when older than RESCAN_SECONDS or after the
server wrote something, so folders added by hand show up within a second. Files are listed from disk
on every request.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

RESCAN_SECONDS = 1.0
READ_CHUNK = 1024 * 1024

SUBJECT_ID_PATTERN = "XNAT_S{:05d}"
EXPERIMENT_ID_PATTERN = "XNAT_E{:05d}"
DEFAULT_SESSION_TYPE = "xnat:mrSessionData"
DEFAULT_ASSESSOR_TYPE = "xnat:qcAssessmentData"
# The scan type that goes with each session type (XNAT pairs them the same way).
SCAN_TYPE_FOR_SESSION = {
    "xnat:mrSessionData": "xnat:mrScanData",
    "xnat:ctSessionData": "xnat:ctScanData",
    "xnat:petSessionData": "xnat:petScanData",
}
MODALITY_FOR_SESSION = {"xnat:mrSessionData": "MR", "xnat:ctSessionData": "CT", "xnat:petSessionData": "PET"}
# Resource labels whose format is obvious; others have an empty format unless resource.json says more.
KNOWN_FORMATS = ("DICOM", "NIFTI", "BIDS", "SNAPSHOTS")
# Folder names inside an experiment that are structure, not data.
EXPERIMENT_CHILDREN = ("scans", "resources", "assessors")

_VALID_NAME = re.compile(r"^[^/\\\x00]+$")
_VALID_LABEL = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


class InvalidName(ValueError):
    """A name from a request that may not become a file or folder name."""


class AlreadyExists(Exception):
    """The object to be created exists already."""


def check_name(name: str) -> str:
    """Return `name` if it is a safe single path component; raise InvalidName otherwise."""
    if name in ("", ".", "..") or not _VALID_NAME.match(name):
        raise InvalidName(f"invalid name {name!r}")
    return name


def check_label(label: str) -> str:
    """Return `label` if XNAT would accept it for a new object ([A-Za-z0-9_-.]); raise InvalidName."""
    if not _VALID_LABEL.match(label):
        raise InvalidName(f"Invalid character in label {label!r}")
    return label


def natural_key(text: str) -> list:
    """Sort key that orders "2" before "10" and "2.1" after "2" (how XNAT lists scans)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def xnat_timestamp(seconds: float) -> str:
    """Format a POSIX time the way XNAT prints insert dates: "YYYY-MM-DD HH:MM:SS.f"."""
    moment = datetime.datetime.fromtimestamp(seconds)
    millis = f"{moment.microsecond // 1000:03d}".rstrip("0") or "0"
    return f"{moment:%Y-%m-%d %H:%M:%S}.{millis}"


def read_json(path: Path) -> dict:
    """Return the object stored in the JSON file `path`; {} when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        print(f"xnatfs serve: ignoring unreadable {path}: {error}", file=sys.stderr, flush=True)
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Write `data` as pretty JSON to `path`."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def subfolders(directory: Path) -> list[str]:
    """Return the names of the visible sub-folders of `directory`, sorted; [] if it does not exist."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


@dataclass
class FileEntry:
    """One file of a resource: `path` is relative to the resource folder, "/"-separated."""

    path: str
    abspath: str
    size: int
    mtime: float
    mtime_ns: int


@dataclass(eq=False)
class Resource:
    """A resource folder; `owner` is the Scan, Experiment or Assessor it belongs to.

    The label is the folder name unless `{folder}.json` gives one ("label", which may be empty or
    shared with another resource of the same owner, as XNAT allows).
    """

    label: str
    directory: Path
    owner: Scan | Experiment | Assessor
    xnat_id: str
    meta: dict

    @property
    def experiment(self) -> Experiment:
        return self.owner if isinstance(self.owner, Experiment) else self.owner.experiment

    @property
    def format(self) -> str:
        return self.meta.get("format", self.label if self.label.upper() in KNOWN_FORMATS else "")

    def uri_base(self) -> str:
        """The URI prefix XNAT puts before a file's path in listings (it uses the resource's ID)."""
        return f"{self.owner.uri}/{self.owner_segment}/{self.xnat_id}/files/"

    def zip_name(self, path: str) -> str:
        """The name XNAT gives file `path` of this resource inside a ZIP (its default "structure").

        XNAT builds the name from the stored path and then rewrites it: every occurrence of the
        experiment ID (file names included) becomes the experiment label, every folder segment equal
        to the scan ID becomes `{ID}-{type}`, and one equal to the resource ID becomes its label.
        """
        experiment = self.experiment
        raw = f"{self.owner.zip_folder}/{self.owner_segment}/{self.xnat_id}/files/{path}"
        raw = raw.replace(experiment.id, experiment.label) if experiment.id else raw
        *folders, name = raw.split("/")
        scan = self.owner if isinstance(self.owner, Scan) else None
        for index, segment in enumerate(folders):
            if scan is not None and segment == scan.id:
                folders[index] = scan.zip_segment
            elif segment == self.xnat_id and self.label:
                folders[index] = self.label
        return "/".join([*folders, name])

    def listed_size(self, entry: FileEntry) -> int:
        """The size the catalog records for a file: the real one unless `listed_sizes` says otherwise."""
        stale = self.meta.get("listed_sizes")
        if isinstance(stale, dict) and entry.path in stale:
            return int(stale[entry.path])
        return entry.size

    @property
    def owner_segment(self) -> str:
        return "out/resources" if isinstance(self.owner, Assessor) else "resources"

    def files(self) -> list[FileEntry]:
        """Return the files below the resource folder (sub-folders included), sorted by path."""
        found = []
        for top, dirs, names in os.walk(self.directory):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                abspath = os.path.join(top, name)
                try:
                    info = os.stat(abspath)
                except OSError:
                    continue  # vanished or a dangling link
                relpath = os.path.relpath(abspath, self.directory).replace(os.sep, "/")
                found.append(FileEntry(relpath, abspath, info.st_size, info.st_mtime, info.st_mtime_ns))
        return sorted(found, key=lambda entry: entry.path)


@dataclass(eq=False)
class ResourceOwner:
    """Common part of the objects that hold resources (scans, experiments, assessors)."""

    directory: Path
    meta: dict
    resources: dict[str, Resource] = field(default_factory=dict)

    def select(self, selector: str) -> list[Resource]:
        """Return the resources a URL segment selects, as XNAT matches it: split on commas, an
        all-digit part is a resource ID, any other part is compared with the labels as sent (no
        percent-decoding). `ALL` is not special. Several resources may share a label."""
        found = []
        for key in selector.split(","):
            if key.isdigit():
                found += [r for r in self.resources.values() if r.xnat_id == key]
            else:
                found += [r for r in self.resources.values() if r.label == key]
        return list(dict.fromkeys(found))

    def resource(self, key: str) -> Resource | None:
        """Return the first resource `key` selects, or None."""
        found = self.select(key)
        return found[0] if found else None

    @property
    def resource_folder(self) -> Path:
        return self.directory / "resources"


@dataclass(eq=False)
class Scan(ResourceOwner):
    id: str = ""
    experiment: Experiment | None = None

    @property
    def type(self) -> str:
        return str(self.meta.get("type", self.meta.get("series_description", "")))

    @property
    def xsi_type(self) -> str:
        return self.meta.get("xsiType") or SCAN_TYPE_FOR_SESSION.get(self.experiment.xsi_type, "xnat:mrScanData")

    @property
    def uri(self) -> str:
        return f"{self.experiment.uri}/scans/{self.id}"

    @property
    def zip_segment(self) -> str:
        """`{ID}-{type}` with every character of the type outside [A-Za-z0-9_] as `_` (the ID alone without a type)."""
        safe_type = re.sub(r"[^A-Za-z0-9_]", "_", self.type)
        return f"{self.id}-{safe_type}" if safe_type else self.id

    @property
    def zip_folder(self) -> str:
        """Before XNAT's rewriting (see Resource.zip_name): the experiment ID and the scan ID."""
        return f"{self.experiment.id}/scans/{self.id}"

    @property
    def numeric_id(self) -> str:
        """Stable integer standing in for XNAT's xnat_imagescandata_id."""
        return str(zlib.crc32(f"{self.experiment.id}/{self.id}".encode()) & 0x7FFFFFFF)


@dataclass(eq=False)
class Assessor(ResourceOwner):
    id: str = ""
    experiment: Experiment | None = None

    @property
    def label(self) -> str:
        return str(self.meta.get("label", self.id))

    @property
    def xsi_type(self) -> str:
        return self.meta.get("xsiType", DEFAULT_ASSESSOR_TYPE)

    @property
    def uri(self) -> str:
        return f"{self.experiment.uri}/assessors/{self.id}"

    @property
    def zip_folder(self) -> str:
        return f"{self.experiment.id}/assessors/{self.id}"


@dataclass(eq=False)
class Experiment(ResourceOwner):
    label: str = ""
    id: str = ""
    subject: Subject | None = None
    scans: dict[str, Scan] = field(default_factory=dict)
    assessors: dict[str, Assessor] = field(default_factory=dict)
    insert_date: str = ""

    @property
    def project(self) -> Project:
        return self.subject.project

    @property
    def xsi_type(self) -> str:
        return self.meta.get("xsiType", DEFAULT_SESSION_TYPE)

    @property
    def modality(self) -> str:
        return self.meta.get("modality", MODALITY_FOR_SESSION.get(self.xsi_type, ""))

    @property
    def uri(self) -> str:
        return f"/data/experiments/{self.id}"

    @property
    def zip_folder(self) -> str:
        return self.id

    @property
    def is_image_session(self) -> bool:
        """False for subject assessors that are not image sessions (e.g. xnat:subjectVariablesData)."""
        return self.xsi_type.endswith("SessionData")

    def assessor(self, key: str) -> Assessor | None:
        """Return the assessor with this ID or label, or None."""
        return self.assessors.get(key) or next((a for a in self.assessors.values() if a.label == key), None)


@dataclass(eq=False)
class Subject:
    label: str
    directory: Path
    meta: dict
    project: Project
    id: str = ""
    insert_date: str = ""
    experiments: dict[str, Experiment] = field(default_factory=dict)

    def experiment(self, key: str) -> Experiment | None:
        """Return the experiment with this label or ID, or None."""
        return self.experiments.get(key) or next((e for e in self.experiments.values() if e.id == key), None)


@dataclass(eq=False)
class Project:
    id: str
    directory: Path
    meta: dict
    subjects: dict[str, Subject] = field(default_factory=dict)

    @property
    def accessibility(self) -> str:
        """XNAT's project accessibility: "public" (guests may read it), "protected" or "private"."""
        value = str(self.meta.get("accessibility", "private")).lower()
        return value if value in ("public", "protected", "private") else "private"

    def subject(self, key: str) -> Subject | None:
        """Return the subject with this label or ID, or None."""
        return self.subjects.get(key) or next((s for s in self.subjects.values() if s.id == key), None)

    def experiments(self) -> Iterator[Experiment]:
        for subject in self.subjects.values():
            yield from subject.experiments.values()

    def experiment(self, key: str) -> Experiment | None:
        """Return the experiment of this project with this label or ID, or None."""
        return next((e for e in self.experiments() if key in (e.label, e.id)), None)


@dataclass
class Index:
    """A snapshot of the archive's folder tree with every object's ID resolved."""

    projects: dict[str, Project]
    subjects: dict[str, Subject]
    experiments: dict[str, Experiment]

    def public(self) -> Index:
        """The part of the archive a guest sees: public projects only."""
        projects = {k: p for k, p in self.projects.items() if p.accessibility == "public"}
        subjects = {k: s for k, s in self.subjects.items() if s.project.id in projects}
        experiments = {k: e for k, e in self.experiments.items() if e.project.id in projects}
        return Index(projects, subjects, experiments)


class Checksums:
    """MD5 digests and CRC-32s of files, cached per (path, size, mtime_ns) so a changed file is re-read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, int, int], str | int] = {}

    def md5(self, entry: FileEntry) -> str:
        """Return the MD5 hex digest of the file."""
        return self._get("md5", entry)

    def crc32(self, entry: FileEntry) -> int:
        """Return the CRC-32 of the file (as ZIP headers need it)."""
        return self._get("crc32", entry)

    def _get(self, kind: str, entry: FileEntry):
        key = (kind, entry.abspath, entry.size, entry.mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        md5 = hashlib.md5(usedforsecurity=False) if kind == "md5" else None
        crc = 0
        with open(entry.abspath, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                if md5:
                    md5.update(chunk)
                else:
                    crc = zlib.crc32(chunk, crc)
        value = md5.hexdigest() if md5 else crc
        with self._lock:
            self._cache[key] = value
        return value


class Archive:
    """An XNAT archive served from the folder `root` (see README-data.md for the layout)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        self.checksums = Checksums()
        self._lock = threading.Lock()
        self._index: Index | None = None
        self._built_at = 0.0

    def index(self) -> Index:
        """Return the current snapshot of the tree, rebuilding it when stale."""
        with self._lock:
            if self._index is None or time.monotonic() - self._built_at > RESCAN_SECONDS:
                self._index = self._build()
                self._built_at = time.monotonic()
            return self._index

    def invalidate(self) -> None:
        """Forget the snapshot so the next request sees the server's own writes."""
        with self._lock:
            self._index = None

    # -- building the snapshot ---------------------------------------------------------------------

    def _build(self) -> Index:
        projects = {}
        for name in subfolders(self.root):
            project = Project(name, self.root / name, read_json(self.root / name / "project.json"))
            projects[name] = project
            for label in subfolders(project.directory):
                subject = Subject(label, project.directory / label, {}, project)
                subject.meta = read_json(subject.directory / "subject.json")
                subject.insert_date = self._insert_date(subject.meta, subject.directory)
                project.subjects[label] = subject
                for exp_label in subfolders(subject.directory):
                    subject.experiments[exp_label] = self._load_experiment(subject, exp_label)
        subjects = [s for p in projects.values() for s in p.subjects.values()]
        experiments = [e for s in subjects for e in s.experiments.values()]
        assessor_ids = {a.id for e in experiments for a in e.assessors.values()}
        self._assign_ids(subjects, SUBJECT_ID_PATTERN, set())
        self._assign_ids(experiments, EXPERIMENT_ID_PATTERN, assessor_ids)
        return Index(projects, {s.id: s for s in subjects}, {e.id: e for e in experiments})

    @staticmethod
    def _insert_date(meta: dict, directory: Path) -> str:
        return str(meta.get("insert_date") or xnat_timestamp(directory.stat().st_mtime))

    @staticmethod
    def _assign_ids(objects: list, pattern: str, taken: set[str]) -> None:
        """Give every object its ID: the one in its json file, else the next free number in sorted order."""
        taken = taken | {str(o.meta["ID"]) for o in objects if o.meta.get("ID")}
        number = 0
        for obj in objects:
            if obj.meta.get("ID"):
                obj.id = str(obj.meta["ID"])
                continue
            while True:
                number += 1
                candidate = pattern.format(number)
                if candidate not in taken:
                    break
            obj.id = candidate

    def _load_experiment(self, subject: Subject, label: str) -> Experiment:
        directory = subject.directory / label
        meta = read_json(directory / "experiment.json")
        experiment = Experiment(directory, meta, label=label, subject=subject)
        experiment.insert_date = self._insert_date(meta, directory)
        self._load_resources(experiment)
        for scan_id in sorted(subfolders(directory / "scans"), key=natural_key):
            scan_dir = directory / "scans" / scan_id
            scan = Scan(scan_dir, read_json(scan_dir / "scan.json"), id=scan_id, experiment=experiment)
            self._load_resources(scan)
            experiment.scans[scan_id] = scan
        for assessor_id in subfolders(directory / "assessors"):
            assessor_dir = directory / "assessors" / assessor_id
            meta = read_json(assessor_dir / "assessor.json")
            assessor = Assessor(assessor_dir, meta, id=assessor_id, experiment=experiment)
            self._load_resources(assessor)
            experiment.assessors[assessor_id] = assessor
        return experiment

    def _load_resources(self, owner: ResourceOwner) -> None:
        for folder in subfolders(owner.resource_folder):
            directory = owner.resource_folder / folder
            relative = directory.relative_to(self.root).as_posix()
            # A stable integer per folder stands in for XNAT's database key xnat_abstractresource_id.
            xnat_id = str(zlib.crc32(relative.encode()) & 0x7FFFFFFF)
            meta = read_json(owner.resource_folder / f"{folder}.json")
            label = str(meta["label"]) if meta.get("label") is not None else folder
            owner.resources[xnat_id] = Resource(label, directory, owner, xnat_id, meta)

    # -- writing -----------------------------------------------------------------------------------

    def safe_path(self, base: Path, parts: list[str]) -> Path:
        """Return base/parts after checking every part and that the result stays inside the root."""
        for part in parts:
            check_name(part)
        target = base.joinpath(*parts)
        real = os.path.realpath(target)
        if not real.startswith(str(self.root) + os.sep):
            raise InvalidName(f"path {'/'.join(parts)!r} leaves the data folder")
        return target

    def create_resource(self, owner: ResourceOwner, label: str, meta: dict) -> Path:
        """Create an empty resource folder (and its json file if `meta` is not empty).

        Returns the folder; raises AlreadyExists or InvalidName.
        """
        if owner.resource(label) is not None:
            raise AlreadyExists(label)
        directory = self.safe_path(owner.resource_folder, [check_label(label)])
        directory.mkdir(parents=True)
        if meta:
            write_json(owner.resource_folder / f"{label}.json", meta)
        self.invalidate()
        return directory

    def write_file(
        self, owner: ResourceOwner, resource_key: str, path: list[str], body: BinaryIO, length: int, overwrite: bool
    ) -> bool:
        """Store `length` bytes from `body` as a file of a resource (created if missing, like XNAT).

        Returns False, without reading the body, when the file exists and `overwrite` is false.
        """
        resource = owner.resource(resource_key)
        if resource is None and resource_key.isdigit():
            raise InvalidName(f"no resource with ID {resource_key}")
        folder = resource.directory if resource else self.safe_path(owner.resource_folder, [check_label(resource_key)])
        target = self.safe_path(folder, path)
        if target.exists() and not overwrite:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so readers never see half a file.
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".upload-", delete=False) as handle:
            try:
                copy_exactly(body, handle, length)
            except BaseException:
                os.unlink(handle.name)
                raise
        os.replace(handle.name, target)
        self.invalidate()
        return True

    def next_id(self, pattern: str, used: set[str]) -> str:
        """Return the first ID following `pattern` that is not in `used`."""
        number = 1
        while pattern.format(number) in used:
            number += 1
        return pattern.format(number)

    def remove_tree(self, directory: Path) -> None:
        """Delete a folder inside the archive (used by import with overwrite=delete)."""
        if not str(directory.resolve()).startswith(str(self.root) + os.sep):
            raise InvalidName(f"{directory} is outside the data folder")
        shutil.rmtree(directory)
        self.invalidate()


def copy_exactly(source: BinaryIO, target: BinaryIO, length: int) -> None:
    """Copy exactly `length` bytes; raise EOFError if the source ends early."""
    remaining = length
    while remaining > 0:
        chunk = source.read(min(READ_CHUNK, remaining))
        if not chunk:
            raise EOFError(f"body ended {remaining} bytes early")
        target.write(chunk)
        remaining -= len(chunk)
