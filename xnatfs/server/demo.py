"""The demo archive `xnatfs serve` serves when no --data is given, generated deterministically.

Two projects (DEMO, with secondary_ID CH-DEMO, and PHANTOM), several subjects and MR sessions plus a CT
session. Every scan is a real DICOM series (64x64 uint16 slices with consistent geometry, so dcm2niix
turns it into one volume); T1w scans also have a NIFTI resource with a matching .nii.gz. Scan IDs include
"2.1", scan types include spaces and a "/", each session has a session-level resource and one session
has an assessor with an out resource. File times are fixed, so every run serves identical bytes.
"""

from __future__ import annotations

import calendar
import gzip
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from .archive import write_json

GENERATOR_VERSION = "1"
MATRIX = 64
PIXEL_SPACING = 3.0  # mm; 64 x 3 mm = 192 mm field of view
UID_SEED = f"xnatfs-demo-{GENERATOR_VERSION}"


@dataclass
class Series:
    """One scan of the demo: its ID, XNAT type (= SeriesDescription), slice count and contrast."""

    scan_id: str
    description: str
    slices: int
    thickness: float
    contrast: float
    nifti: bool = False


MR_SERIES = [
    Series("1", "T1w", 16, 5.0, 1.0, nifti=True),
    Series("2", "T2 FLAIR/axial", 20, 4.0, 0.6),
    Series("2.1", "T2 FLAIR/axial MPR", 20, 4.0, 0.8),
]
CT_SERIES = [Series("1", "CT HEAD", 24, 3.0, 1.0)]

# project -> (project.json, {subject: [(session label, date, modality)]})
DEMO_PROJECTS = {
    "DEMO": (
        {
            "name": "xnatfs demo project",
            "secondary_ID": "CH-DEMO",
            "description": "Generated MR sessions for trying out xnatfs",
            "pi_firstname": "Ada",
            "pi_lastname": "Lovelace",
        },
        {
            "DEMO_001": [("DEMO_001_MR1", "2024-01-15", "MR"), ("DEMO_001_MR2", "2024-06-20", "MR")],
            "DEMO_002": [("DEMO_002_MR1", "2024-02-03", "MR")],
            "DEMO_003": [("DEMO_003_MR1", "2024-02-17", "MR")],
        },
    ),
    "PHANTOM": (
        {"name": "Phantom scans", "description": "Quality-control phantom, MR and CT", "accessibility": "public"},
        {"PHANTOM_01": [("PHANTOM_01_MR1", "2024-03-01", "MR"), ("PHANTOM_01_CT1", "2024-03-01", "CT")]},
    ),
}
ASSESSOR = ("DEMO_001_MR1", "XNAT_E00100", "DEMO_001_MR1_QC")  # session label, assessor ID, label


def generate_demo_archive(root: str | os.PathLike) -> Path:
    """Write the demo archive into the (empty or new) folder `root`; returns it. Takes about a second."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for project_id, (project_meta, subjects) in DEMO_PROJECTS.items():
        project_dir = root / project_id
        project_dir.mkdir()
        write_json(project_dir / "project.json", project_meta)
        for number, (subject, sessions) in enumerate(subjects.items(), start=1):
            subject_dir = project_dir / subject
            subject_dir.mkdir()
            write_json(subject_dir / "subject.json", {"group": "control" if number % 2 else "patient"})
            for label, date, modality in sessions:
                _write_session(subject_dir / label, project_id, subject, label, date, modality, number)
    return root


def _write_session(
    directory: Path, project: str, subject: str, label: str, date: str, modality: str, subject_number: int
) -> None:
    stamp = calendar.timegm((*map(int, date.split("-")), 12, 0, 0))
    session_type = "xnat:ctSessionData" if modality == "CT" else "xnat:mrSessionData"
    study_uid = generate_uid(entropy_srcs=[UID_SEED, label])
    directory.mkdir()
    write_json(
        directory / "experiment.json",
        {
            "date": date,
            "time": "12:00:00",
            "xsiType": session_type,
            "UID": study_uid,
            "insert_date": f"{date} 18:30:00.0",
            "scanner": "xnatfs virtual scanner",
        },
    )
    series_list = CT_SERIES if modality == "CT" else MR_SERIES
    for number, series in enumerate(series_list, start=1):
        scan_dir = directory / "scans" / series.scan_id
        scan_dir.mkdir(parents=True)
        write_json(
            scan_dir / "scan.json",
            {"type": series.description, "series_description": series.description, "quality": "usable"},
        )
        volume = _phantom(series, subject_number)
        dicom_dir = scan_dir / "resources" / "DICOM"
        dicom_dir.mkdir(parents=True)
        header = {
            "PatientName": subject,
            "PatientID": subject,
            "StudyInstanceUID": study_uid,
            "StudyID": label,
            "StudyDate": date.replace("-", ""),
            "Modality": modality,
            "SeriesNumber": number,
            "SeriesInstanceUID": generate_uid(entropy_srcs=[UID_SEED, label, series.scan_id]),
            "FrameOfReferenceUID": generate_uid(entropy_srcs=[UID_SEED, label, "frame"]),
        }
        for index in range(series.slices):
            _write_slice(dicom_dir / f"{index + 1:04d}.dcm", header, series, volume[index], index)
        if series.nifti:
            nifti_dir = scan_dir / "resources" / "NIFTI"
            nifti_dir.mkdir(parents=True)
            _write_nifti(nifti_dir / f"{series.description}.nii.gz", volume, series.thickness)
    resource = directory / "resources" / "EXTRA" / "protocol"
    resource.mkdir(parents=True)
    (resource / "notes.txt").write_text(f"Session {label} of subject {subject} in project {project}.\n")
    (directory / "resources" / "EXTRA" / "summary.json").write_text(
        json.dumps({"session": label, "scans": [s.scan_id for s in series_list]}, indent=2) + "\n"
    )
    if label == ASSESSOR[0]:
        assessor_dir = directory / "assessors" / ASSESSOR[1]
        (assessor_dir / "resources" / "QC").mkdir(parents=True)
        write_json(assessor_dir / "assessor.json", {"label": ASSESSOR[2], "xsiType": "xnat:qcAssessmentData"})
        (assessor_dir / "resources" / "QC" / "report.json").write_text(
            json.dumps({"session": label, "pass": True, "snr": 42.0}, indent=2) + "\n"
        )
    for path in directory.rglob("*"):
        os.utime(path, (stamp, stamp))


def _phantom(series: Series, subject_number: int) -> np.ndarray:
    """A (slices, 64, 64) uint16 volume: an ellipsoid 'head' with a brighter inner sphere."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, series.slices), np.linspace(-1, 1, MATRIX), np.linspace(-1, 1, MATRIX), indexing="ij"
    )
    scale = 0.8 + 0.05 * subject_number
    head = (x / (0.75 * scale)) ** 2 + (y / (0.9 * scale)) ** 2 + (z / 0.95) ** 2 <= 1
    core = (x - 0.1) ** 2 + (y + 0.1) ** 2 + z**2 <= 0.15
    volume = 400 * head + 600 * series.contrast * core + 20 * (1 + np.sin(7 * x) * np.cos(5 * y))
    return volume.astype(np.uint16)


def _write_slice(path: Path, header: dict, series: Series, pixels: np.ndarray, index: int) -> None:
    sop_class = CTImageStorage if header["Modality"] == "CT" else MRImageStorage
    sop_uid = generate_uid(entropy_srcs=[header["SeriesInstanceUID"], str(index)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.description
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = header["StudyID"]
    ds.Manufacturer = "xnatfs"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    offset = -PIXEL_SPACING * MATRIX / 2
    z_start = -series.thickness * series.slices / 2
    ds.ImagePositionPatient = [offset, offset, round(z_start + index * series.thickness, 3)]
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
    ds.SliceThickness = series.thickness
    ds.SpacingBetweenSlices = series.thickness
    if header["Modality"] == "MR":
        ds.MagneticFieldStrength = 3
        ds.RepetitionTime = 2000 if series.contrast == 1.0 else 9000
        ds.EchoTime = 3 if series.contrast == 1.0 else 90
    else:
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.Rows = ds.Columns = MATRIX
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


# NIfTI-1 header (348 bytes); see https://nifti.nimh.nih.gov/nifti-1 for the field list.
NIFTI_HEADER = struct.Struct("<i10s18sihcc8h3fhhhh8ffffhccffffii80s24shh6f4f4f4f16s4s")
NIFTI_UINT16 = 512


def _write_nifti(path: Path, volume: np.ndarray, thickness: float) -> None:
    """Write `volume` (slices, rows, columns) as a gzipped single-file NIfTI-1 with a scanner (sform) affine."""
    slices, rows, columns = volume.shape
    offset = PIXEL_SPACING * MATRIX / 2  # DICOM LPS origin (-offset, -offset) becomes RAS (+offset, +offset)
    z_start = -thickness * slices / 2
    header = NIFTI_HEADER.pack(
        348, b"", b"", 0, 0, b"r", b"\0",
        *(3, columns, rows, slices, 1, 1, 1, 1),
        0.0, 0.0, 0.0,
        0, NIFTI_UINT16, 16, 0,
        *(1.0, PIXEL_SPACING, PIXEL_SPACING, thickness, 0.0, 0.0, 0.0, 0.0),
        352.0, 1.0, 0.0,
        slices - 1, b"\0", b"\x0a",  # xyzt_units: mm and seconds
        0.0, 0.0, 0.0, 0.0, 0, 0,
        b"xnatfs demo", b"",
        0, 1,  # qform_code unknown, sform_code scanner
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        -PIXEL_SPACING, 0.0, 0.0, offset,
        0.0, -PIXEL_SPACING, 0.0, offset,
        0.0, 0.0, thickness, z_start,
        b"", b"n+1\0",
    )  # fmt: skip
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + b"\0\0\0\0" + volume.astype("<u2").tobytes())
