"""`POST /data/services/import`: turn a zip of DICOM files into a session of the archive.

Each DICOM series becomes a scan (SeriesNumber -> scan ID, SeriesDescription -> type) whose files go into
its DICOM resource as {SOPInstanceUID}.dcm. Subject and session labels come from the query (like XNAT's
`subject=` and `session=`), else from PatientName and StudyID/StudyDate.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .archive import (
    EXPERIMENT_ID_PATTERN,
    SUBJECT_ID_PATTERN,
    AlreadyExists,
    Archive,
    check_label,
    check_name,
    read_json,
    write_json,
)

SESSION_TYPE_FOR_MODALITY = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "PT": "xnat:petSessionData"}


class ImportFailed(ValueError):
    """The upload cannot be imported; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _label_from(value, fallback: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_\-]+", "_", str(value or "")).strip("_")
    return text or fallback


def import_dicom_zip(archive: Archive, zip_path: Path, query: dict[str, str]) -> str:
    """Import the DICOM files of the zip at `zip_path`; returns the new session's URI.

    Raises ImportFailed (unknown project, no DICOM inside, session exists without overwrite=...),
    InvalidName for unusable labels.
    """
    index = archive.index()
    project = index.projects.get(query.get("project", ""))
    if project is None:
        raise ImportFailed(400, "import needs project=<an existing project ID>")
    overwrite = query.get("overwrite", "none").lower()
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=archive.root))  # hidden: the index skips it
    try:
        first = _unpack(zip_path, staging)
        if first is None:
            raise ImportFailed(400, "the upload holds no DICOM files")
        subject_label = check_label(query.get("subject") or _label_from(first.get("PatientName"), "SUBJECT"))
        default_session = _label_from(first.get("StudyID") or first.get("StudyDate"), "MR1")
        session_label = check_label(query.get("session") or f"{subject_label}_{default_session}")

        subject_dir = archive.safe_path(project.directory, [subject_label])
        target = archive.safe_path(subject_dir, [session_label])
        if target.exists():
            if overwrite == "delete":
                archive.remove_tree(target)
            elif overwrite != "append":
                raise AlreadyExists(session_label)
        if not subject_dir.exists():
            subject_dir.mkdir()
            write_json(subject_dir / "subject.json", {"ID": archive.next_id(SUBJECT_ID_PATTERN, set(index.subjects))})
        target.mkdir(exist_ok=True)
        _merge(staging, target)
        meta = read_json(target / "experiment.json")
        if "ID" not in meta:
            taken = set(index.experiments) | {a for e in index.experiments.values() for a in e.assessors}
            meta["ID"] = archive.next_id(EXPERIMENT_ID_PATTERN, taken)
        meta.setdefault("xsiType", SESSION_TYPE_FOR_MODALITY.get(str(first.get("Modality", "")), "xnat:mrSessionData"))
        study_date = str(first.get("StudyDate", ""))
        if len(study_date) == 8:
            meta.setdefault("date", f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}")
        if first.get("StudyInstanceUID"):
            meta.setdefault("UID", str(first.StudyInstanceUID))
        write_json(target / "experiment.json", meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.invalidate()
    return f"/data/archive/projects/{project.id}/subjects/{subject_label}/experiments/{session_label}"


def _unpack(zip_path: Path, staging: Path) -> pydicom.Dataset | None:
    """Sort the DICOM files of the zip into staging/scans/{series}/resources/DICOM/.

    Returns the header of the first DICOM file (None if there was none); other files are skipped.
    """
    first = None
    try:
        archive_zip = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as error:
        raise ImportFailed(400, f"the upload is not a zip file: {error}") from error
    with archive_zip:
        for member in archive_zip.infolist():
            if member.is_dir():
                continue
            with archive_zip.open(member) as handle:
                try:
                    header = pydicom.dcmread(handle, stop_before_pixels=True)
                except (InvalidDicomError, EOFError, ValueError):
                    continue
            if "SOPInstanceUID" not in header:
                continue
            series = check_name(str(header.get("SeriesNumber", "") or "1"))
            scan_dir = staging / "scans" / series
            dicom_dir = scan_dir / "resources" / "DICOM"
            if not dicom_dir.exists():
                dicom_dir.mkdir(parents=True)
                description = str(header.get("SeriesDescription", ""))
                write_json(scan_dir / "scan.json", {"type": description, "series_description": description})
            with (
                archive_zip.open(member) as source,
                open(dicom_dir / f"{check_name(header.SOPInstanceUID)}.dcm", "wb") as out,
            ):
                shutil.copyfileobj(source, out)
            first = first or header
    return first


def _merge(source: Path, target: Path) -> None:
    """Move the unpacked tree into the session folder, replacing files that exist already."""
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(exist_ok=True)
        elif not (path.name == "scan.json" and destination.exists()):
            path.replace(destination)
