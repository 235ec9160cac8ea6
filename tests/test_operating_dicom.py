"""Operating a mounted PACS: DICOM UIDs as extended attributes, prefetch of a study by series."""

from __future__ import annotations

import os

import pytest
from mounting import mounted, xnatfs
from pacs import available, make_series, orthanc
from pydicom.uid import generate_uid

from xnatfs.transports.dicom import DicomTransport

pytestmark = pytest.mark.timeout(120)


def test_dicom_uids_as_xattrs_and_prefetch_of_a_study(tmp_path):
    if not available("orthanc"):
        pytest.fail("orthanc is not installed: scripts/setup installs it")
    study_uid = generate_uid()
    datasets = make_series(count=3, study_uid=study_uid) + make_series(count=2, study_uid=study_uid, series_number=8)
    with orthanc(workdir=str(tmp_path / "orthanc")) as pacs:
        store = DicomTransport(netloc=f"{pacs.aet}@{pacs.host}:{pacs.port}", opts={"cache_dir": str(tmp_path / "c0")})
        for ds in datasets:
            assert store.store(ds) == 0
        mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
        with mounted(pacs.url, mnt, cache, dict(os.environ), timeout=10):
            patient = os.path.join(mnt, "PAT-001")
            study = os.path.join(patient, os.listdir(patient)[0])
            series = sorted(os.path.join(study, name) for name in os.listdir(study))
            instance = os.path.join(series[0], sorted(os.listdir(series[0]))[0])
            assert os.getxattr(patient, "user.dicom.PatientID") == b"PAT-001"
            assert os.getxattr(study, "user.dicom.StudyInstanceUID") == study_uid.encode()
            by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
            sop = os.getxattr(instance, "user.dicom.SOPInstanceUID").decode()
            assert os.path.basename(instance) == f"{sop}.dcm"
            assert os.getxattr(instance, "user.dicom.SeriesInstanceUID").decode() == by_uid[sop].SeriesInstanceUID
            assert os.getxattr(instance, "user.dicom.StudyInstanceUID") == study_uid.encode()
            # Looking an instance up retrieves its series (the kernel is only told true sizes).
            assert os.getxattr(instance, "user.xnatfs.cached") == b"1"

            result = xnatfs("prefetch", study)
            assert result.returncode == 0, result.stderr
            assert "2 resources cached" in result.stdout  # one unit per series (the first may be complete already)
            for folder in series:
                for name in os.listdir(folder):
                    assert os.getxattr(os.path.join(folder, name), "user.xnatfs.cached") == b"1"
            status = xnatfs("status", "--json", mnt).stdout
            assert '"downloads": 2' in status  # two C-GETs, and reading makes none
            for folder in series:
                for name in os.listdir(folder):
                    with open(os.path.join(folder, name), "rb") as f:
                        assert f.read(132)[128:] == b"DICM"
            assert '"downloads": 2' in xnatfs("status", "--json", mnt).stdout
