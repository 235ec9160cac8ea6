"""The embedded server's archive on disk: an XNAT archive stored as plain folders, read and written.

The layout is documented in README-data.md. `Archive.index()` gives a snapshot of the folder tree
(projects down to resources, not the files: the objects of :mod:`.model`); it is rebuilt when older
than RESCAN_SECONDS or after the server wrote something, so folders added by hand show up within a
second. Files are listed from disk on every request.
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
from pathlib import Path
from typing import BinaryIO

from .model import Assessor, Experiment, FileEntry, Index, Project, Resource, ResourceOwner, Scan, Subject

RESCAN_SECONDS = 1.0
READ_CHUNK = 1024 * 1024

SUBJECT_ID_PATTERN = "XNAT_S{:05d}"
EXPERIMENT_ID_PATTERN = "XNAT_E{:05d}"
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
