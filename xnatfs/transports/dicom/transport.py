"""The PACS as a tree: patients, studies, series and instances from C-FIND; a series is the unit of content."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from xnatfs import __version__
from xnatfs.cache import Filler
from xnatfs.names import safe_component, unique_names
from xnatfs.options import CALLING_AET, Option
from xnatfs.transports.base import (
    AbstractTransport,
    AssociationFailed,
    AssociationNotEstablished,
    Entry,
    Unit,
    normpath,
)
from xnatfs.transports.dicom.client import DEFAULT_CALLING_AET, DimseClient, dimse_query, parse_netloc

log = logging.getLogger(__name__)

# How long a failed series retrieve is reported again without asking the PACS (seconds): listing a
# series looks up every instance, and each must not wait for its own timeout when the PACS is down.
FAILURE_MEMORY = 10.0
# What a C-FIND at each level (study root) asks for: the level's UID first, then what names and dates its folders.
_LEVEL_KEYS = {
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription"),
    "SERIES": ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "SeriesDate", "SeriesTime"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}


@dataclass(frozen=True)
class _Patient:
    patient_id: str


@dataclass(frozen=True)
class _Study:
    patient_id: str
    study_uid: str
    mtime: float


@dataclass(frozen=True)
class _Series:
    study_uid: str
    series_uid: str
    mtime: float


@dataclass(frozen=True)
class _Instance:
    """Where an instance lives: its series' cache entry (key and version) and its member name."""

    study_uid: str
    series_uid: str
    sop_uid: str
    member: str
    version: str
    sop_classes: tuple[str, ...]


class DicomTransport(DimseClient, AbstractTransport):
    """A DICOM PACS (query/retrieve SCP) as a read-only tree, plus :meth:`store` to upload."""

    name = "dicom"
    description = "DICOM PACS: listings by C-FIND, content by C-GET of whole series, upload by C-STORE"
    authors = "xnatfs developers"
    version = __version__
    url = "https://pypi.org/project/xnatfs/"
    schemes = ["dicom"]
    options = (Option("--calling-aet", default=CALLING_AET, help="our AE title, for dicom:// sources"),)
    needs_credentials = False
    sizes_known = False  # an instance's size is known only once its series has been retrieved

    def _setup(self) -> None:
        """Describe the PACS at ``netloc`` (``AET@host[:port]``); nothing is sent yet.

        Raises ValueError for a malformed ``netloc`` or a ``root`` other than ``/``.
        """
        self.called_aet, self.host, self.port = parse_netloc(self.netloc or "")
        if normpath(self.root or "/") != "/":
            raise ValueError(f"dicom:// URLs name a whole PACS, not a path inside it (got {self.root!r})")
        self.calling_aet = str(self.opts.get("calling_aet") or DEFAULT_CALLING_AET)
        max_pdu = self.opts.get("max_pdu")
        self.max_pdu = None if max_pdu is None else int(max_pdu)
        self.peer = f"{self.called_aet}@{self.host}:{self.port}"
        self._counter_lock = threading.Lock()
        #: Number of C-GET retrieves started by this transport (one per series fill).
        self.retrieve_count = 0
        #: Number of associations requested by this transport (established or not).
        self.association_count = 0
        self._failures: dict[str, tuple[float, Exception]] = {}  # series UID -> (when, why) of a failed retrieve

    # -- primitives ---------------------------------------------------------------------------

    def _list(self, path: str) -> list[Entry]:
        """Return the entries of folder ``path``, by one C-FIND at the level below it.

        Raises NotADirectoryError for an instance, AssociationNotEstablished or AssociationFailed
        when the PACS cannot be reached or answers with a failure status.
        """
        if path == "/":
            return self._list_patients()
        ref = self.stat(path).ref
        if isinstance(ref, _Patient):
            return self._list_studies(ref)
        if isinstance(ref, _Study):
            return self._list_series(ref)
        if isinstance(ref, _Series):
            return self._list_instances(ref)
        raise NotADirectoryError(path)

    def _unit(self, path: str, entry: Entry) -> Unit | None:
        """An instance's unit is its series (one C-GET)."""
        ref = entry.ref
        if not isinstance(ref, _Instance):
            return None
        key = ("dicom", self.peer, ref.study_uid, ref.series_uid)
        return Unit(key, ref.version, ref.member, ref.series_uid, posixpath.dirname(path), ref=ref)

    def _fetch(self, path: str, entry: Entry) -> str:
        """Return the cached file of instance ``path``, retrieving its whole series if needed.

        Blocks until that instance has arrived (not the whole series). Raises FileNotFoundError if
        the PACS did not send it, AssociationNotEstablished / AssociationFailed / TimeoutError if
        the retrieve failed; for ``FAILURE_MEMORY`` seconds after a failure, AssociationFailed at
        once for every instance of that series.
        """
        ref = entry.ref
        if not isinstance(ref, _Instance):
            raise IsADirectoryError(path)
        with self._counter_lock:
            when, error = self._failures.get(ref.series_uid, (0.0, None))
        if error is not None and time.monotonic() - when < FAILURE_MEMORY:
            raise AssociationFailed(f"{error} (not retried for {FAILURE_MEMORY:g} s)")
        try:
            return super()._fetch(path, entry)
        except (AssociationNotEstablished, AssociationFailed, TimeoutError) as error:
            with self._counter_lock:
                self._failures[ref.series_uid] = (time.monotonic(), error)
            raise

    # -- listings -----------------------------------------------------------------------------

    def _list_patients(self) -> list[Entry]:
        query = dimse_query("PATIENT", PatientID="", PatientName="")
        found = self._find(PatientRootQueryRetrieveInformationModelFind, query)
        ids = sorted({str(ds.get("PatientID", "") or "") for ds in found})
        return [
            Entry(name=name, is_dir=True, key=f"dicom-patient:{pid}", ref=_Patient(pid))
            for name, pid in zip(unique_names(ids), ids)
        ]

    def _list_studies(self, patient: _Patient) -> list[Entry]:
        # PatientID may hold C-FIND wildcards (* and ?): keep exact matches only.
        found = self._find_level("STUDY", {"PatientID": patient.patient_id}, exact="PatientID")
        ordered = sorted(found, key=lambda ds: (str(ds.get("StudyDate", "")), ds.StudyInstanceUID))
        labels = [
            f"{ds.get('StudyDate') or 'undated'}-{ds.get('AccessionNumber') or ds.StudyInstanceUID}" for ds in ordered
        ]
        refs = [
            _Study(patient.patient_id, str(ds.StudyInstanceUID), _timestamp(ds.get("StudyDate"), ds.get("StudyTime")))
            for ds in ordered
        ]
        return [_folder(name, ref, ref.study_uid) for name, ref in zip(unique_names(labels), refs)]

    def _list_series(self, study: _Study) -> list[Entry]:
        found = self._find_level("SERIES", {"StudyInstanceUID": study.study_uid})
        ordered = sorted(found, key=lambda ds: (_number(ds.get("SeriesNumber")), ds.SeriesInstanceUID))
        refs = [
            _Series(
                study.study_uid,
                str(ds.SeriesInstanceUID),
                _timestamp(ds.get("SeriesDate"), ds.get("SeriesTime")) or study.mtime,
            )
            for ds in ordered
        ]
        names = unique_names(_series_label(ds) for ds in ordered)
        return [_folder(name, ref, ref.series_uid) for name, ref in zip(names, refs)]

    def _list_instances(self, series: _Series) -> list[Entry]:
        match = {"StudyInstanceUID": series.study_uid, "SeriesInstanceUID": series.series_uid}
        found = self._find_level("IMAGE", match)
        uids = sorted(str(ds.SOPInstanceUID) for ds in found)
        version = "sops:" + hashlib.sha256("\n".join(uids).encode()).hexdigest()
        sop_classes = tuple(sorted({str(ds.SOPClassUID) for ds in found if ds.get("SOPClassUID")}))
        entries = []
        for name, uid in zip(unique_names(f"{uid}.dcm" for uid in uids), uids):
            member = safe_component(f"{uid}.dcm")
            ref = _Instance(series.study_uid, series.series_uid, uid, member, version, sop_classes)
            # No size: the base class finds it in the cache once the series has been retrieved.
            entries.append(Entry(name=name, is_dir=False, size=None, mtime=series.mtime, key=uid, ref=ref))
        return entries

    def _find_level(self, level: str, match: dict[str, str], exact: str | None = None) -> list[Dataset]:
        """Return what one C-FIND at ``level`` finds below ``match`` (the keys of the levels above),
        asking for the keys :data:`_LEVEL_KEYS` names: one dataset per UID of the level (none without
        one). ``exact`` names a key of ``match`` that may hold C-FIND wildcards: only datasets whose
        value is ``match``'s to the letter are kept.

        Raises AssociationNotEstablished or AssociationFailed (see :meth:`_find`).
        """
        keys = _LEVEL_KEYS[level]
        uid = keys[0]
        query = dimse_query(level, **match, **dict.fromkeys(keys, ""))
        found = self._find(StudyRootQueryRetrieveInformationModelFind, query)
        if exact is not None:
            found = [ds for ds in found if str(ds.get(exact, "") or "") == match[exact]]
        return list({str(ds.get(uid)): ds for ds in found if ds.get(uid)}.values())

    def _fill(self, unit: Unit, filler: Filler) -> None:
        self.retrieve_series(unit.ref, filler)

    def metadata(self, path: str) -> dict[str, str]:
        """Return the UIDs of ``path`` and of the levels above it (``dicom.PatientID``,
        ``dicom.StudyInstanceUID``, ``dicom.SeriesInstanceUID``, ``dicom.SOPInstanceUID``), from
        listings only. Raises FileNotFoundError."""
        ref = self.stat(path).ref
        found: dict[str, str] = {}
        parts = normpath(path).strip("/").split("/")
        if ref is not None:
            patient = self.stat("/" + parts[0]).ref
            if isinstance(patient, _Patient):
                found["dicom.PatientID"] = patient.patient_id
        if isinstance(ref, (_Study, _Series, _Instance)):
            found["dicom.StudyInstanceUID"] = ref.study_uid
        if isinstance(ref, (_Series, _Instance)):
            found["dicom.SeriesInstanceUID"] = ref.series_uid
        if isinstance(ref, _Instance):
            found["dicom.SOPInstanceUID"] = ref.sop_uid
        return found


def _folder(name: str, ref: _Study | _Series, uid: str) -> Entry:
    """Return the folder entry of a study or series."""
    return Entry(name=name, is_dir=True, mtime=ref.mtime, key=uid, ref=ref)


def _series_label(ds: Dataset) -> str:
    number = str(ds.get("SeriesNumber", "") or "").strip()
    description = str(ds.get("SeriesDescription", "") or "").strip()
    if number and description:
        return f"{number}-{description}"
    return number or description or str(ds.SeriesInstanceUID)


def _number(value: Any) -> float:
    """Return ``value`` as a number for sorting (unnumbered last)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def _timestamp(date: Any, time: Any) -> float:
    """Return DA/TM values as seconds since the epoch (local time), 0.0 if there is no valid date."""
    date_text = str(date or "").strip()
    time_text = str(time or "").strip().split(".")[0].ljust(6, "0")[:6]
    try:
        return datetime.strptime(date_text + time_text, "%Y%m%d%H%M%S").timestamp()
    except ValueError:
        return 0.0


__all__ = ["DicomTransport", "parse_netloc"]
