"""Real PACS servers for tests, and generated DICOM series to put in them.

Each server runs as a child process on loopback with free ports, in a temporary folder, and is
killed when its context manager exits:

* :func:`orthanc` -- Orthanc (Debian package ``orthanc``), C-FIND/C-GET/C-STORE allowed to anyone;
* :func:`dcmqrscp` -- dcmtk's ``dcmqrscp`` in its default forking mode.

Both yield a :class:`Pacs` (AE title, host, port, ``url`` for ``dicom://``). :func:`make_series`
generates a small valid MR series with pydicom.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

HOST = "127.0.0.1"
BINARIES = {"orthanc": ("Orthanc", "/usr/sbin/Orthanc"), "dcmqrscp": ("dcmqrscp", "/usr/bin/dcmqrscp")}
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Pacs:
    """A running PACS: where to reach it, and what it is (``kind``: 'orthanc' or 'dcmqrscp')."""

    kind: str
    aet: str
    host: str
    port: int
    workdir: str

    @property
    def url(self) -> str:
        """Return the ``dicom://AET@host:port`` URL of the PACS."""
        return f"dicom://{self.aet}@{self.host}:{self.port}"


def binary(kind: str) -> str | None:
    """Return the executable of PACS ``kind`` ('orthanc' or 'dcmqrscp'), None if it is not installed."""
    name, fallback = BINARIES[kind]
    return shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)


def available(kind: str) -> bool:
    """Return True if PACS ``kind`` can be started here."""
    return binary(kind) is not None


def free_port() -> int:
    """Return a TCP port of loopback on which nothing listens right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def echo(aet: str, host: str, port: int, timeout: float = 2.0) -> bool:
    """Return True if the peer answers a C-ECHO with success within ``timeout`` seconds."""
    ae = AE(ae_title="XNATFS-ECHO")
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return getattr(status, "Status", None) == 0x0000
    finally:
        assoc.release()


@contextlib.contextmanager
def _running(kind: str, argv: list[str], aet: str, port: int, workdir: str, log_path: str) -> Iterator[Pacs]:
    """Start ``argv`` in its own process group, wait until it answers C-ECHO, kill it on exit.

    Raises RuntimeError (with the end of its log) if it exits or does not answer within
    ``READY_TIMEOUT`` seconds.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not echo(aet, HOST, port, timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path, "rb") as log:
                    tail = log.read()[-2000:].decode("utf-8", "replace")
                raise RuntimeError(f"{kind} did not start (exit code {process.poll()}):\n{tail}")
            time.sleep(0.1)
        yield Pacs(kind=kind, aet=aet, host=HOST, port=port, workdir=workdir)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the process group of ``process`` (its forked children too); kill it if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
    # Children forked by dcmqrscp share the group and may outlive their parent.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def orthanc(aet: str = "ORTHANC", workdir: str | None = None) -> Iterator[Pacs]:
    """Run Orthanc on free loopback ports with storage in ``workdir`` (a temporary folder by default).

    C-FIND, C-GET and C-STORE are allowed to any calling AE; the REST API (on a free port) is
    loopback-only without authentication. Yields a :class:`Pacs`.
    """
    with _workdir(workdir, "orthanc-") as folder:
        port = free_port()
        config = {
            "Name": "xnatfs-test",
            "DicomAet": aet,
            "DicomPort": port,
            "HttpPort": free_port(),
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": os.path.join(folder, "storage"),
            "IndexDirectory": os.path.join(folder, "index"),
            "StorageCompression": False,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {},
            "Plugins": [],
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }
        config_path = os.path.join(folder, "orthanc.json")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        argv = [binary("orthanc") or "Orthanc", "--no-jobs", config_path]
        with _running("orthanc", argv, aet, port, folder, os.path.join(folder, "orthanc.log")) as pacs:
            yield pacs


@contextlib.contextmanager
def dcmqrscp(aet: str = "DCMQRSCP", workdir: str | None = None) -> Iterator[Pacs]:
    """Run dcmtk's ``dcmqrscp`` (default forking mode) on a free loopback port.

    Its configuration gives ``aet`` a read-write storage area in ``workdir`` open to any peer;
    it accepts C-STORE, C-FIND and C-GET. Yields a :class:`Pacs`.
    """
    with _workdir(workdir, "dcmqrscp-") as folder:
        port = free_port()
        storage = os.path.join(folder, "storage")
        os.makedirs(storage)
        config_path = os.path.join(folder, "dcmqrscp.cfg")
        with open(config_path, "w") as f:
            f.write(
                f"NetworkTCPPort = {port}\n"
                "MaxPDUSize = 16384\n"
                "MaxAssociations = 32\n"
                "\nHostTable BEGIN\nHostTable END\n"
                "\nVendorTable BEGIN\nVendorTable END\n"
                f"\nAETable BEGIN\n{aet} {storage} RW (1000, 1024mb) ANY\nAETable END\n"
            )
        argv = [binary("dcmqrscp") or "dcmqrscp", "-c", config_path, str(port)]
        with _running("dcmqrscp", argv, aet, port, folder, os.path.join(folder, "dcmqrscp.log")) as pacs:
            yield pacs


@contextlib.contextmanager
def _workdir(workdir: str | None, prefix: str) -> Iterator[str]:
    """Yield ``workdir`` (created if missing), else a temporary folder removed afterwards."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        yield workdir
        return
    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_series(
    count: int = 4,
    size: int = 32,
    patient_id: str = "PAT-001",
    study_date: str = "20240131",
    accession: str = "ACC123",
    series_number: int = 7,
    series_description: str = "T1/MPRAGE sag",
    study_uid: str | None = None,
) -> list[Dataset]:
    """Return ``count`` MR instances (``size`` x ``size``, 16-bit, distinct pixel data) of one new series.

    Every instance has its own SOPInstanceUID; all share a new SeriesInstanceUID and ``study_uid``
    (new if None). The datasets carry file meta (Explicit VR Little Endian), ready to store or save.
    """
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = generate_uid()
    rng = np.random.default_rng(abs(hash(series_uid)) % 2**32)
    datasets = []
    for number in range(1, count + 1):
        ds = Dataset()
        sop_uid = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientID = patient_id
        ds.PatientName = "Test^Patient"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = study_date
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = accession
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "xnatfs test study"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.Modality = "MR"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTrainLength = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
        ds.PixelData = pixels.tobytes()
        datasets.append(ds)
    return datasets
