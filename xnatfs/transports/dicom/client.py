"""The DIMSE side of the DICOM transport: associations, C-FIND, C-GET of a series into a cache
filler, C-STORE. Mixed into :class:`~xnatfs.transports.dicom.transport.DicomTransport`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any
from urllib.parse import unquote

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from xnatfs.cache import Filler
from xnatfs.names import safe_component
from xnatfs.options import CALLING_AET, TIMEOUT
from xnatfs.transports.base import (
    AssociationFailed,
    AssociationNotEstablished,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 104
DEFAULT_CALLING_AET = CALLING_AET
DEFAULT_TIMEOUT = TIMEOUT
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


class DimseClient:
    """Talks DIMSE to the peer ``called_aet``@``host``:``port`` as ``calling_aet`` (attributes set by
    the transport), every wait bounded by ``timeout``."""

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
            raise AssociationFailed(
                f"C-STORE of {ds.SOPInstanceUID} to {self.peer} failed with status {_status_text(status)}"
            )
        return code

    def retrieve_series(self, ref: Any, filler: Filler) -> None:
        """Fill a series' cache entry by one C-GET; each instance is published as it arrives.

        Raises AssociationNotEstablished, or AssociationFailed if the C-GET ends with anything
        but success (including partial failures).
        """
        with self._counter_lock:
            self.retrieve_count += 1
        sop_classes = list(ref.sop_classes) or [cx.abstract_syntax for cx in StoragePresentationContexts]
        sop_classes = [uid for uid in sop_classes if uid][:MAX_STORAGE_CONTEXTS]
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
        contexts += [build_context(uid, RETRIEVE_TRANSFER_SYNTAXES) for uid in sop_classes]
        roles = [build_role(uid, scp_role=True) for uid in sop_classes]
        received: list[str] = []
        handlers = [(evt.EVT_C_STORE, _on_c_store, [filler, received])]
        query = dimse_query("SERIES", StudyInstanceUID=ref.study_uid, SeriesInstanceUID=ref.series_uid)
        what = f"C-GET of series {ref.series_uid} from {self.peer}"
        with self._association(contexts, ext_neg=roles, evt_handlers=handlers) as assoc:
            final = self._responses(
                lambda: assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), what, received=received
            )
        if _status_code(final) != STATUS_SUCCESS:
            counts = ", ".join(
                f"{getattr(final, k, '?')} {label}"
                for k, label in (
                    ("NumberOfCompletedSuboperations", "completed"),
                    ("NumberOfFailedSuboperations", "failed"),
                    ("NumberOfWarningSuboperations", "warnings"),
                )
            )
            raise AssociationFailed(f"{what} ended with status {_status_text(final)} ({counts})")
        log.info("retrieved series %s from %s: %d instances", ref.series_uid, self.peer, len(received))

    # -- DIMSE plumbing -----------------------------------------------------------------------

    def _find(self, model: str, query: Dataset) -> list[Dataset]:
        """Return the identifiers a C-FIND with ``query`` matches.

        Raises AssociationNotEstablished, or AssociationFailed on a failure status, no answer
        within the timeout, or a refused information model.
        """
        what = f"C-FIND ({query.QueryRetrieveLevel}) at {self.peer}"
        results: list[Dataset] = []
        with self._association([build_context(model)]) as assoc:
            final = self._responses(lambda: assoc.send_c_find(query, model), what, found=results)
        if _status_code(final) != STATUS_SUCCESS:
            raise AssociationFailed(f"{what} failed with status {_status_text(final)}")
        return results

    def _responses(
        self,
        request: Callable[[], Iterable[tuple[Dataset, Dataset | None]]],
        what: str,
        found: list[Dataset] | None = None,
        received: Sized | None = None,
    ) -> Dataset | None:
        """Send a C-FIND or C-GET (``request``; ``what`` names it in errors) and go through its
        responses: the identifiers of pending ones go to ``found``; return the final status (None if
        the peer ended without one).

        Raises AssociationFailed when the peer refuses the request's presentation context, or when a
        response does not come within the timeout or the association breaks (``received``: the
        instances that had arrived by then, for the message).
        """
        final = None
        try:
            for status, identifier in request():
                code = _status_code(status)
                if code is None:
                    so_far = "" if received is None else f" ({len(received)} instances received)"
                    raise AssociationFailed(
                        f"{what}: no answer within {self.timeout:g} s or association aborted{so_far}"
                    )
                if code not in STATUS_PENDING:
                    final = status
                elif found is not None and identifier is not None:
                    found.append(identifier)
        except ValueError as error:  # no accepted presentation context for the request
            raise AssociationFailed(f"{what} refused: {error}") from error
        return final

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


def dimse_query(level: str, **keys: str) -> Dataset:
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


def _status_text(status: Dataset | None) -> str:
    """Return a DIMSE response's status for a message: ``0xA700``, with its error comment if any, or ``none``."""
    code = _status_code(status)
    if code is None:
        return "none"
    comment = getattr(status, "ErrorComment", "")
    return f"0x{code:04X}" + (f": {comment}" if comment else "")
