"""The embedded server's archive as objects: projects, subjects, experiments, scans, assessors, resources.

A snapshot of the folder tree (see :class:`Index`), built by :class:`~xnatfs.server.archive.Archive`;
files are listed from disk when asked.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
        return _find(self.assessors, key)


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
        return _find(self.experiments, key)


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
        return _find(self.subjects, key)

    def experiments(self) -> Iterator[Experiment]:
        for subject in self.subjects.values():
            yield from subject.experiments.values()

    def experiment(self, key: str) -> Experiment | None:
        """Return the experiment of this project with this label or ID, or None."""
        return next((e for e in self.experiments() if key in (e.label, e.id)), None)


def _find(objects: dict, key: str):
    """Return the object stored under `key`, else the one whose label or ID is `key`, else None."""
    return objects.get(key) or next((o for o in objects.values() if key in (o.label, o.id)), None)


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

    def of_kind(self, kind: str) -> dict:
        """Return the objects of one top-level kind ("projects", "subjects" or "experiments") by ID."""
        return {"projects": self.projects, "subjects": self.subjects, "experiments": self.experiments}[kind]
