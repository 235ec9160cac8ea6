"""DICOM PACS transport: C-FIND for listings, C-GET of whole series into the cache, C-STORE to upload.

URL: ``dicom://AET@host:port`` (``AET`` is the called AE title; port 104 if omitted). Tree::

    /{PatientID}
      /{StudyDate}-{AccessionNumber or StudyInstanceUID}
        /{SeriesNumber}-{SeriesDescription}
          /{SOPInstanceUID}.dcm

Every component is made safe and unique (:func:`xnatfs.names.unique_names`). A study without a
date is named ``undated-...``; a series without a description ``{SeriesNumber}``, without either
``{SeriesInstanceUID}``.

Listings only ever use C-FIND (patient level with Patient Root, study, series and instance levels
with Study Root): they never move pixel data. File sizes are therefore unknown (``Entry.size`` is
None) until the series has been retrieved once; after that they come from the cached files. (The
mount never tells the kernel an unknown size: looking an instance up there retrieves its series.)

Reading any instance retrieves its whole series with one C-GET into one cache entry, keyed by
(``dicom``, ``AET@host:port``, StudyInstanceUID, SeriesInstanceUID) with the series' sorted
SOPInstanceUIDs as version. The cache makes sure one retrieve runs per series however many threads
or processes read it; each instance is published as it arrives, so the first reader does not wait
for the whole series.

Options (``opts``): ``calling_aet`` (default ``XNATFS``), ``timeout`` (seconds, default 30: bounds
the TCP connection, association negotiation and every wait for a DIMSE message), ``cache`` (a
:class:`xnatfs.cache.Cache`) or ``cache_dir`` (the default cache folder if neither is given),
``max_pdu`` (largest PDU we accept, bytes; 0 = unlimited; pynetdicom's default if absent), plus those of
:class:`~xnatfs.transports.base.AbstractTransport`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from xnatfs import __version__
from xnatfs.cache import Filler
from xnatfs.names import safe_component, unique_names
from xnatfs.transports.base import (
    AbstractTransport,
    AssociationFailed,
    AssociationNotEstablished,
    Entry,
    Unit,
    normpath,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 104
DEFAULT_CALLING_AET = "XNATFS"
DEFAULT_TIMEOUT = 30.0
# A presentation context ID is odd and below 256: at most 128 contexts per association, one of
# which carries the C-GET itself.
MAX_STORAGE_CONTEXTS = 127
# Transfer syntaxes we accept for retrieved instances: uncompressed first (what we prefer), then
# every compressed one, so a PACS never has to transcode (we store the bytes as received).
RETRIEVE_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
]
STATUS_SUCCESS = 0x0000
STATUS_PENDING = (0xFF00, 0xFF01)
STORE_WARNINGS = (0xB000, 0xB006, 0xB007)
STATUS_OUT_OF_RESOURCES = 0xA700
# How long a failed series retrieve is reported again without asking the PACS (seconds): listing a
# series looks up every instance, and each must not wait for its own timeout when the PACS is down.
FAILURE_MEMORY = 10.0


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


class DicomTransport(AbstractTransport):
    """A DICOM PACS (query/retrieve SCP) as a read-only tree, plus :meth:`store` to upload."""

    name = "dicom"
    description = "DICOM PACS: listings by C-FIND, content by C-GET of whole series, upload by C-STORE"
    authors = "xnatfs developers"
    version = __version__
    url = "https://pypi.org/project/xnatfs/"
    schemes = ["dicom"]
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

    # -- upload -------------------------------------------------------------------------------

    def store(self, ds: Dataset) -> int:
        """Send ``ds`` to the PACS by C-STORE; return the status (0x0000, or a warning code).

        Raises AssociationNotEstablished if no association could be made, AssociationFailed if the
        PACS refused the dataset's SOP class or transfer syntax, answered with a failure status, or
        did not answer within the timeout; ValueError if ``ds`` lacks SOPClassUID/SOPInstanceUID.
        """
        sop_class = getattr(ds, "SOPClassUID", None)
        if not sop_class or not getattr(ds, "SOPInstanceUID", None):
            raise ValueError("a dataset to store needs SOPClassUID and SOPInstanceUID")
        meta = getattr(ds, "file_meta", None)
        syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        syntaxes = [syntax] if syntax else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        # Verification is proposed too, so that a PACS that refuses the SOP class still accepts the
        # association and the refusal is reported as such (not as a PACS that cannot be reached).
        contexts = [build_context(sop_class, syntaxes)]
        if sop_class != Verification:
            contexts.append(build_context(Verification))
        with self._association(contexts) as assoc:
            try:
                status = assoc.send_c_store(ds)
            except ValueError as error:  # no accepted presentation context for this SOP class
                raise AssociationFailed(f"C-STORE to {self.peer} refused: {error}") from error
        code = _status_code(status)
        self.invalidate()
        if code is None:
            raise AssociationFailed(
                f"C-STORE to {self.peer}: no answer within {self.timeout:g} s or association aborted"
            )
        if code != STATUS_SUCCESS and code not in STORE_WARNINGS:
            comment = getattr(status, "ErrorComment", "")
            raise AssociationFailed(
                f"C-STORE of {ds.SOPInstanceUID} to {self.peer} failed with status 0x{code:04X}"
                + (f": {comment}" if comment else "")
            )
        return code

    # -- listings -----------------------------------------------------------------------------

    def _list_patients(self) -> list[Entry]:
        query = _query("PATIENT", PatientID="", PatientName="")
        found = self._find(PatientRootQueryRetrieveInformationModelFind, query)
        ids = sorted({str(ds.get("PatientID", "") or "") for ds in found})
        return [
            Entry(name=name, is_dir=True, key=f"dicom-patient:{pid}", ref=_Patient(pid))
            for name, pid in zip(unique_names(ids), ids)
        ]

    def _list_studies(self, patient: _Patient) -> list[Entry]:
        query = _query(
            "STUDY",
            PatientID=patient.patient_id,
            StudyInstanceUID="",
            StudyDate="",
            StudyTime="",
            AccessionNumber="",
            StudyDescription="",
        )
        found = self._find(StudyRootQueryRetrieveInformationModelFind, query)
        # PatientID may hold C-FIND wildcards (* and ?): keep exact matches only.
        studies = {
            str(ds.StudyInstanceUID): ds
            for ds in found
            if ds.get("StudyInstanceUID") and str(ds.get("PatientID", "") or "") == patient.patient_id
        }
        ordered = sorted(studies.values(), key=lambda ds: (str(ds.get("StudyDate", "")), ds.StudyInstanceUID))
        labels = [
            f"{ds.get('StudyDate') or 'undated'}-{ds.get('AccessionNumber') or ds.StudyInstanceUID}" for ds in ordered
        ]
        entries = []
        for name, ds in zip(unique_names(labels), ordered):
            mtime = _timestamp(ds.get("StudyDate"), ds.get("StudyTime"))
            ref = _Study(patient.patient_id, str(ds.StudyInstanceUID), mtime)
            entries.append(Entry(name=name, is_dir=True, mtime=mtime, key=ref.study_uid, ref=ref))
        return entries

    def _list_series(self, study: _Study) -> list[Entry]:
        query = _query(
            "SERIES",
            StudyInstanceUID=study.study_uid,
            SeriesInstanceUID="",
            SeriesNumber="",
            SeriesDescription="",
            Modality="",
            SeriesDate="",
            SeriesTime="",
        )
        found = self._find(StudyRootQueryRetrieveInformationModelFind, query)
        series = {str(ds.SeriesInstanceUID): ds for ds in found if ds.get("SeriesInstanceUID")}
        ordered = sorted(series.values(), key=lambda ds: (_number(ds.get("SeriesNumber")), ds.SeriesInstanceUID))
        entries = []
        for name, ds in zip(unique_names(_series_label(ds) for ds in ordered), ordered):
            mtime = _timestamp(ds.get("SeriesDate"), ds.get("SeriesTime")) or study.mtime
            ref = _Series(study.study_uid, str(ds.SeriesInstanceUID), mtime)
            entries.append(Entry(name=name, is_dir=True, mtime=mtime, key=ref.series_uid, ref=ref))
        return entries

    def _list_instances(self, series: _Series) -> list[Entry]:
        query = _query(
            "IMAGE",
            StudyInstanceUID=series.study_uid,
            SeriesInstanceUID=series.series_uid,
            SOPInstanceUID="",
            SOPClassUID="",
            InstanceNumber="",
        )
        found = self._find(StudyRootQueryRetrieveInformationModelFind, query)
        instances = {str(ds.SOPInstanceUID): ds for ds in found if ds.get("SOPInstanceUID")}
        uids = sorted(instances)
        version = "sops:" + hashlib.sha256("\n".join(uids).encode()).hexdigest()
        sop_classes = tuple(sorted({str(ds.SOPClassUID) for ds in instances.values() if ds.get("SOPClassUID")}))
        entries = []
        for name, uid in zip(unique_names(f"{uid}.dcm" for uid in uids), uids):
            member = safe_component(f"{uid}.dcm")
            ref = _Instance(series.study_uid, series.series_uid, uid, member, version, sop_classes)
            # No size: the base class finds it in the cache once the series has been retrieved.
            entries.append(Entry(name=name, is_dir=False, size=None, mtime=series.mtime, key=uid, ref=ref))
        return entries

    # -- retrieve -----------------------------------------------------------------------------

    def _fill(self, unit: Unit, filler: Filler) -> None:
        """Fill a series' cache entry by one C-GET; each instance is published as it arrives.

        Raises AssociationNotEstablished, or AssociationFailed if the C-GET ends with anything
        but success (including partial failures).
        """
        ref: _Instance = unit.ref
        with self._counter_lock:
            self.retrieve_count += 1
        sop_classes = list(ref.sop_classes) or [cx.abstract_syntax for cx in StoragePresentationContexts]
        sop_classes = [uid for uid in sop_classes if uid][:MAX_STORAGE_CONTEXTS]
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
        contexts += [build_context(uid, RETRIEVE_TRANSFER_SYNTAXES) for uid in sop_classes]
        roles = [build_role(uid, scp_role=True) for uid in sop_classes]
        received: list[str] = []
        handlers = [(evt.EVT_C_STORE, _on_c_store, [filler, received])]
        query = _query("SERIES", StudyInstanceUID=ref.study_uid, SeriesInstanceUID=ref.series_uid)
        final: Dataset | None = None
        with self._association(contexts, ext_neg=roles, evt_handlers=handlers) as assoc:
            try:
                for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                    code = _status_code(status)
                    if code is None:
                        raise AssociationFailed(
                            f"C-GET of series {ref.series_uid} from {self.peer}: no answer within "
                            f"{self.timeout:g} s or association aborted ({len(received)} instances received)"
                        )
                    if code not in STATUS_PENDING:
                        final = status
            except ValueError as error:  # the PACS did not accept the C-GET presentation context
                raise AssociationFailed(f"C-GET from {self.peer} refused: {error}") from error
        code = _status_code(final)
        if code != STATUS_SUCCESS:
            counts = ", ".join(
                f"{getattr(final, k, '?')} {label}"
                for k, label in (
                    ("NumberOfCompletedSuboperations", "completed"),
                    ("NumberOfFailedSuboperations", "failed"),
                    ("NumberOfWarningSuboperations", "warnings"),
                )
            )
            shown = "none" if code is None else f"0x{code:04X}"
            raise AssociationFailed(
                f"C-GET of series {ref.series_uid} from {self.peer} ended with status {shown} ({counts})"
            )
        log.info("retrieved series %s from %s: %d instances", ref.series_uid, self.peer, len(received))

    # -- DIMSE plumbing -----------------------------------------------------------------------

    def _find(self, model: str, query: Dataset) -> list[Dataset]:
        """Return the identifiers a C-FIND with ``query`` matches.

        Raises AssociationNotEstablished, or AssociationFailed on a failure status, no answer
        within the timeout, or a refused information model.
        """
        results: list[Dataset] = []
        with self._association([build_context(model)]) as assoc:
            try:
                for status, identifier in assoc.send_c_find(query, model):
                    code = _status_code(status)
                    if code is None:
                        raise AssociationFailed(
                            f"C-FIND ({query.QueryRetrieveLevel}) at {self.peer}: no answer within "
                            f"{self.timeout:g} s or association aborted"
                        )
                    if code in STATUS_PENDING:
                        if identifier is not None:
                            results.append(identifier)
                    elif code == STATUS_SUCCESS:
                        break
                    else:
                        comment = getattr(status, "ErrorComment", "")
                        raise AssociationFailed(
                            f"C-FIND ({query.QueryRetrieveLevel}) at {self.peer} failed with status "
                            f"0x{code:04X}" + (f": {comment}" if comment else "")
                        )
            except ValueError as error:
                raise AssociationFailed(f"C-FIND at {self.peer} refused: {error}") from error
        return results

    @contextlib.contextmanager
    def _association(
        self,
        contexts: list[PresentationContext],
        ext_neg: list[Any] | None = None,
        evt_handlers: list[Any] | None = None,
    ) -> Iterator[Association]:
        """Yield an established association with the PACS; release it after (abort on error).

        Raises AssociationNotEstablished if the PACS is unreachable, rejects or does not answer
        within the timeout.
        """
        ae = AE(ae_title=self.calling_aet)
        ae.connection_timeout = self.timeout
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        with self._counter_lock:
            self.association_count += 1
        options: dict[str, Any] = {} if self.max_pdu is None else {"max_pdu": self.max_pdu}
        assoc = ae.associate(
            self.host,
            self.port,
            contexts=contexts,
            ae_title=self.called_aet,
            ext_neg=ext_neg,
            evt_handlers=evt_handlers,
            **options,
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                why = "rejected"
            elif assoc.is_aborted:
                why = "aborted"
            else:
                why = f"no connection or no answer within {self.timeout:g} s"
            raise AssociationNotEstablished(f"no association with {self.peer} as {self.calling_aet}: {why}")
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            assoc.release()

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


def parse_netloc(netloc: str) -> tuple[str, str, int]:
    """Return ``(called AE title, host, port)`` from ``AET@host[:port]`` (IPv6 hosts in brackets).

    Raises ValueError if the AE title or the host is missing, or the AE title is longer than 16.
    """
    aet, at, hostport = netloc.rpartition("@")
    aet = unquote(aet).strip()
    if not at or not aet:
        raise ValueError(f"dicom:// URL needs a called AE title: dicom://AET@host:port (got {netloc!r})")
    if len(aet) > 16:
        raise ValueError(f"AE title {aet!r} is longer than 16 characters")
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"dicom:// URL needs a host (got {netloc!r})")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {netloc!r}") from None
    return aet, host, port


def _on_c_store(event: Event, filler: Filler, received: list[str]) -> int:
    """Write a C-STORE sub-operation's instance to staging as ``{SOPInstanceUID}.dcm`` and publish it.

    The bytes are written as sent (no decoding) to a temporary name, then renamed. Returns the
    status for the PACS: success, or out of resources if it could not be written.
    """
    uid = str(event.request.AffectedSOPInstanceUID)
    try:
        filler.write(safe_component(f"{uid}.dcm"), event.encoded_dataset(include_meta=True))
    except OSError as error:
        log.error("cannot write retrieved instance %s: %s", uid, error)
        return STATUS_OUT_OF_RESOURCES
    received.append(uid)
    return STATUS_SUCCESS


def _query(level: str, **keys: str) -> Dataset:
    """Return a C-FIND/C-GET identifier at ``level`` with ``keys`` (empty string: return this key)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _status_code(status: Dataset | None) -> int | None:
    """Return the Status of a DIMSE response, None if there was none (timeout, abort)."""
    code = getattr(status, "Status", None) if status is not None else None
    return int(code) if code is not None else None


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
