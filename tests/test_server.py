"""Tests of the embedded XNAT-compatible server, against real server processes and the real xnat client."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import requests
import xnat
from xnat.exceptions import XNATLoginFailedError

REPO = Path(__file__).resolve().parent.parent
SESSION = "/data/projects/DEMO/subjects/DEMO_001/experiments/DEMO_001_MR1"
SESSION_DIR = Path("DEMO/DEMO_001/DEMO_001_MR1")
REALM = 'Basic realm="XNAT Protected Area"'


@pytest.fixture
def connection(server):
    session = xnat.connect(server.url, user=server.user, password=server.password, loglevel="ERROR")
    yield session
    session.disconnect()


def get(server, path: str, **kwargs) -> requests.Response:
    """GET a server path with Basic auth."""
    return requests.get(server.url + path, auth=(server.user, server.password), timeout=30, **kwargs)


def demo_files(server, relative: Path) -> dict[str, bytes]:
    """Return {path below `relative`: content} for the files the server serves from its data folder."""
    root = server.data_dir / relative
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the xnat client ---------------------------------------------------------------------------------


def test_client_lists_every_level(connection):
    assert set(connection.projects.keys()) == {"DEMO", "PHANTOM"}
    project = connection.projects["DEMO"]
    assert (project.secondary_id, project.name, project.pi.lastname) == ("CH-DEMO", "xnatfs demo project", "Lovelace")
    assert sorted(s.label for s in project.subjects.values()) == ["DEMO_001", "DEMO_002", "DEMO_003"]
    subject = project.subjects["DEMO_001"]
    assert sorted(subject.experiments.key_map) == ["DEMO_001_MR1", "DEMO_001_MR2"]
    experiment = subject.experiments["DEMO_001_MR1"]
    assert type(experiment).__name__ == "MrSessionData"
    assert (experiment.label, str(experiment.date), experiment.subject_id) == ("DEMO_001_MR1", "2024-01-15", subject.id)
    assert list(experiment.scans.keys()) == ["1", "2", "2.1"]
    scan = experiment.scans["2"]
    assert (scan.type, scan.image_session_id) == ("T2 FLAIR/axial", experiment.id)
    assert experiment.scans["T2 FLAIR/axial MPR"].id == "2.1"  # scans are also found by type
    assert sorted(experiment.scans["1"].resources.key_map) == ["DICOM", "NIFTI"]
    dicom = experiment.scans["1"].resources["DICOM"]
    assert dicom.file_count == 16 and len(dicom.files) == 16
    assert sorted(experiment.resources["EXTRA"].files.keys()) == ["protocol/notes.txt", "summary.json"]
    assessor = experiment.assessors["XNAT_E00100"]
    assert (assessor.label, list(assessor.resources["QC"].files.keys())) == ("DEMO_001_MR1_QC", ["report.json"])
    ct_session = connection.projects["PHANTOM"].experiments["PHANTOM_01_CT1"]
    assert type(ct_session).__name__ == "CtSessionData"
    assert type(ct_session.scans["1"]).__name__ == "CtScanData"


def test_client_connects_with_alias_token(server, connection):
    token = connection.get_json("/data/services/tokens/issue")
    with xnat.connect(server.url, user=token["alias"], password=token["secret"], loglevel="ERROR") as session:
        assert "DEMO" in session.projects.keys()
    token_logins = [r for r in server.requests() if r["path"] == "/" and r["user"] == "admin"]
    assert len(token_logins) == 1  # the client's token login: GET / with Basic auth, session cookie back


def test_bad_password_raises_login_error(server):
    with pytest.raises(XNATLoginFailedError):
        xnat.connect(server.url, user=server.user, password="wrong", loglevel="CRITICAL")
    assert [r["status"] for r in server.requests() if r["path"] == "/data/services/auth"] == [401]


def test_download_dir_gives_the_sessions_files(connection, server, tmp_path):
    connection.experiments["DEMO_001_MR1"].download_dir(tmp_path, verbose=False)
    got = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    expected = {}
    for scan_folder, scan_id in (("1-T1w", "1"), ("2-T2_FLAIR_axial", "2"), ("2.1-T2_FLAIR_axial_MPR", "2.1")):
        for path, content in demo_files(server, SESSION_DIR / "scans" / scan_id / "resources").items():
            label, rest = path.split("/", 1)
            expected[f"DEMO_001_MR1/scans/{scan_folder}/resources/{label}/files/{rest}"] = content
    assert got == expected


def test_file_download_checks_md5(connection, server, tmp_path):
    file = connection.experiments["DEMO_002_MR1"].scans["1"].resources["NIFTI"].files["T1w.nii.gz"]
    on_disk = (server.data_dir / "DEMO/DEMO_002/DEMO_002_MR1/scans/1/resources/NIFTI/T1w.nii.gz").read_bytes()
    assert file.digest == hashlib.md5(on_disk).hexdigest()
    file.download(tmp_path / "t1.nii.gz", verbose=False)  # raises if the digest does not match
    assert (tmp_path / "t1.nii.gz").read_bytes() == on_disk


def test_upload_then_list_and_download(connection, server, tmp_path):
    scan = connection.experiments["DEMO_003_MR1"].scans["2"]
    resource = scan.create_resource("UPLOADS", format="TXT")
    local = tmp_path / "hello.txt"
    local.write_bytes(b"hello from a test\n")
    resource.upload(local, "sub/dir/hello.txt")
    resource.clearcache()
    files = resource.files
    assert list(files.keys()) == ["sub/dir/hello.txt"]
    files["sub/dir/hello.txt"].download(tmp_path / "back.txt", verbose=False)
    assert (tmp_path / "back.txt").read_bytes() == local.read_bytes()
    stored = server.data_dir / "DEMO/DEMO_003/DEMO_003_MR1/scans/2/resources/UPLOADS/sub/dir/hello.txt"
    assert stored.read_bytes() == local.read_bytes()
    row = get(server, "/data/projects/DEMO/experiments/DEMO_003_MR1/scans/2/resources?format=json").json()["ResultSet"][
        "Result"
    ]
    assert {r["label"]: r["format"] for r in row}["UPLOADS"] == "TXT"


# -- HTTP-level protocol -----------------------------------------------------------------------------


def test_missing_or_bad_credentials_get_401_with_realm(server):
    for auth in (None, ("admin", "wrong")):
        response = requests.get(server.url + "/data/projects", auth=auth, timeout=10)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == REALM


def test_expired_session_needs_credentials_again(server):
    http = requests.Session()
    session_id = http.put(server.url + "/data/services/auth", data={"username": "admin", "password": "admin"}).text
    assert http.cookies["JSESSIONID"] == session_id
    assert http.get(server.url + "/data/auth").text == "User 'admin' is logged in"
    assert http.get(server.url + "/data/JSESSION").text == session_id
    server.expire_sessions()
    assert http.get(server.url + "/data/projects?format=json").status_code == 401
    assert http.get(server.url + "/data/projects?format=json", auth=("admin", "admin")).status_code == 200


def test_listings_use_xnat_fields_columns_and_labels(server):
    rows = get(server, "/data/archive/projects?format=json&columns=ID%2Cname").json()["ResultSet"]["Result"]
    assert rows == [
        {"ID": "DEMO", "name": "xnatfs demo project", "URI": "/data/projects/DEMO"},
        {"ID": "PHANTOM", "name": "Phantom scans", "URI": "/data/projects/PHANTOM"},
    ]
    by_label = get(server, f"{SESSION}/scans?format=json").json()
    by_id = get(server, "/data/projects/DEMO/subjects/XNAT_S00001/experiments/XNAT_E00001/scans?format=json").json()
    assert by_label == by_id == get(server, "/data/experiments/XNAT_E00001/scans?format=json").json()
    experiment = get(server, "/data/projects/DEMO/experiments?format=json").json()["ResultSet"]["Result"][0]
    assert set(experiment) == {"ID", "project", "label", "date", "xsiType", "insert_date", "URI"}
    assert experiment["insert_date"] == "2024-01-15 18:30:00.0"
    resources = get(server, f"{SESSION}/scans/1/resources?format=json").json()["ResultSet"]["Result"]
    assert {"xnat_abstractresource_id", "label", "element_name", "file_count", "file_size"} <= set(resources[0])
    files = get(server, f"{SESSION}/scans/1/resources/DICOM/files?format=json").json()["ResultSet"]["Result"]
    resource_id = {r["label"]: r["xnat_abstractresource_id"] for r in resources}["DICOM"]
    assert files[0]["URI"] == f"/data/experiments/XNAT_E00001/scans/1/resources/{resource_id}/files/0001.dcm"
    assert files[0]["cat_ID"] == resource_id and len(files[0]["digest"]) == 32
    assert get(server, "/data/version").status_code == 404
    assert get(server, "/data/projects/NOPE?format=json").status_code == 404


def test_single_file_get_and_head(server):
    path = f"{SESSION}/scans/2.1/resources/DICOM/files/0003.dcm"
    on_disk = (server.data_dir / SESSION_DIR / "scans/2.1/resources/DICOM/0003.dcm").read_bytes()
    response = get(server, path)
    assert response.content == on_disk
    assert response.headers["Content-Length"] == str(len(on_disk)) and "Last-Modified" in response.headers
    head = requests.head(server.url + path, auth=("admin", "admin"), timeout=10)
    assert head.headers["Content-Length"] == str(len(on_disk)) and head.content == b""


def read_local_entries(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """Walk a ZIP's local headers in order: (name, flags, method, data); checks CRC and sizes."""
    entries, offset = [], 0
    while data[offset : offset + 4] == b"PK\x03\x04":
        _, _, flags, method, _, _, crc, csize, size, name_len, extra_len = struct.unpack_from(
            "<IHHHHHIIIHH", data, offset
        )
        start = offset + 30 + name_len + extra_len
        content = data[start : start + csize]
        assert method == 0 and size == csize == len(content) and zlib.crc32(content) == crc
        entries.append((data[offset + 30 : offset + 30 + name_len].decode(), flags, method, content))
        offset = start + csize
    assert data[offset : offset + 4] == b"PK\x01\x02"  # the central directory follows the last entry
    return entries


def test_zip_is_streamed_chunked_and_stored_with_xnat_layout(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    headers = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode()}
    connection.request("GET", "/data/experiments/XNAT_E00001/scans/ALL/files?format=zip", headers=headers)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    body = response.read()
    entries = read_local_entries(body)
    assert all(flags & 0x08 == 0 for _, flags, _, _ in entries)  # sizes and CRC stand in the local header
    names = {name: content for name, _, _, content in entries}
    expected = demo_files(server, SESSION_DIR / "scans/2.1/resources/DICOM")
    prefix = "DEMO_001_MR1/scans/2.1-T2_FLAIR_axial_MPR/resources/DICOM/files/"
    assert {n[len(prefix) :]: c for n, c in names.items() if n.startswith(prefix)} == expected
    assert "DEMO_001_MR1/scans/1-T1w/resources/NIFTI/files/T1w.nii.gz" in names
    assert len(names) == 16 + 1 + 20 + 20
    assert zipfile.ZipFile(io.BytesIO(body)).testzip() is None
    connection.request("GET", "/data/auth", headers=headers)  # the connection is kept alive
    assert connection.getresponse().read() == b"User 'admin' is logged in"


@pytest.mark.parametrize(
    "path, expected_prefixes",
    [
        ("scans/1/resources/DICOM/files", {"DEMO_001_MR1/scans/1-T1w/resources/DICOM/files/"}),
        (
            "scans/1/files",
            {"DEMO_001_MR1/scans/1-T1w/resources/DICOM/files/", "DEMO_001_MR1/scans/1-T1w/resources/NIFTI/files/"},
        ),
        (
            "scans/1,2.1/resources/DICOM/files",
            {
                "DEMO_001_MR1/scans/1-T1w/resources/DICOM/files/",
                "DEMO_001_MR1/scans/2.1-T2_FLAIR_axial_MPR/resources/DICOM/files/",
            },
        ),
        ("scans/ALL/resources/NIFTI/files", {"DEMO_001_MR1/scans/1-T1w/resources/NIFTI/files/"}),
        ("resources/EXTRA/files", {"DEMO_001_MR1/resources/EXTRA/files/"}),
        (
            "assessors/XNAT_E00100/out/resources/QC/files",
            {"DEMO_001_MR1/assessors/XNAT_E00100/out/resources/QC/files/"},
        ),
        ("assessors/ALL/resources/QC/files", {"DEMO_001_MR1/assessors/XNAT_E00100/out/resources/QC/files/"}),
    ],
)
def test_zip_selections(server, path, expected_prefixes):
    response = get(server, f"{SESSION}/{path}?format=zip")
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert {name.rsplit("/files/", 1)[0] + "/files/" for name in names} == expected_prefixes
    if path.startswith("resources/EXTRA"):
        assert "DEMO_001_MR1/resources/EXTRA/files/protocol/notes.txt" in names


def test_zip_of_nothing_is_404(server):
    assert get(server, f"{SESSION}/scans/ALL/resources/NOPE/files?format=zip").status_code == 404


def test_zip_with_compression_uses_deflate_and_data_descriptors(server):
    body = get(server, f"{SESSION}/scans/1/files?format=zip&compression=6").content
    archive = zipfile.ZipFile(io.BytesIO(body))
    infos = archive.infolist()
    assert all(i.compress_type == zipfile.ZIP_DEFLATED and i.flag_bits & 0x08 for i in infos)
    nifti = archive.read("DEMO_001_MR1/scans/1-T1w/resources/NIFTI/files/T1w.nii.gz")
    assert nifti == (server.data_dir / SESSION_DIR / "scans/1/resources/NIFTI/T1w.nii.gz").read_bytes()


def test_uploads_report_duplicates_and_existing_resources(server):
    base = server.url + "/data/projects/DEMO/experiments/DEMO_001_MR2/resources"
    auth = ("admin", "admin")
    assert requests.put(f"{base}/NEWRES", auth=auth, timeout=10).status_code == 200
    assert requests.put(f"{base}/NEWRES", auth=auth, timeout=10).status_code == 409
    assert requests.put(f"{base}/NEWRES/files/a.txt", data=b"one", auth=auth, timeout=10).status_code == 200
    duplicate = requests.put(f"{base}/NEWRES/files/a.txt", data=b"two", auth=auth, timeout=10)
    assert (duplicate.status_code, duplicate.json()) == (200, {"duplicates": ["a.txt"]})
    assert requests.get(f"{base}/NEWRES/files/a.txt", auth=auth, timeout=10).content == b"one"
    replaced = requests.put(f"{base}/NEWRES/files/a.txt?overwrite=true", data=b"two", auth=auth, timeout=10)
    assert replaced.status_code == 200
    assert requests.get(f"{base}/NEWRES/files/a.txt", auth=auth, timeout=10).content == b"two"
    # A file PUT into a resource that does not exist yet creates it, as XNAT does.
    assert requests.put(f"{base}/AUTO/files/b.txt", data=b"b", auth=auth, timeout=10).status_code == 200
    assert (server.data_dir / "DEMO/DEMO_001/DEMO_001_MR2/resources/AUTO/b.txt").read_bytes() == b"b"
    # Objects other than resources and files cannot be created or changed.
    assert requests.put(f"{server.url}/data/projects/DEMO/subjects/NEW", auth=auth, timeout=10).status_code == 405
    assert requests.delete(f"{base}/NEWRES/files/a.txt", auth=auth, timeout=10).status_code == 405


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("NEWRES/files/%2E%2E/%2E%2E/%2E%2E/evil.txt", 400),
        ("%2E%2E/files/evil.txt", 400),
        # Without %20 or %2B the path is not decoded: a harmless file literally named so.
        ("NEWRES/files/a%2F..%2F..%2Fevil.txt", 200),
        # With them it is decoded, and its ".." refused.
        ("NEWRES/files/a%20b%2F..%2F..%2F..%2F..%2Fevil.txt", 400),
        ("NEWRES/files/a%2Bb/%2E%2E/%2E%2E/%2E%2E/%2E%2E/evil.txt", 400),
    ],
)
def test_uploads_cannot_escape_the_data_folder(server, path, status):
    response = requests.put(
        f"{server.url}/data/projects/DEMO/experiments/DEMO_001_MR2/resources/{path}",
        data=b"x",
        auth=("admin", "admin"),
        timeout=10,
    )
    assert response.status_code == status
    assert not list(server.data_dir.rglob("evil.txt")) and not (server.data_dir.parent / "evil.txt").exists()


def test_import_dicom_zip_creates_a_session(connection, server, tmp_path):
    source = server.data_dir / "PHANTOM/PHANTOM_01/PHANTOM_01_CT1/scans/1/resources/DICOM"
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for path in sorted(source.iterdir()):
            archive.write(path, f"dicom/{path.name}")
        archive.writestr("README.txt", "not DICOM, skipped")
    experiment = connection.services.import_(upload, project="PHANTOM", subject="IMPORTED", experiment="IMPORTED_CT1")
    assert (experiment.label, type(experiment).__name__, str(experiment.date)) == (
        "IMPORTED_CT1",
        "CtSessionData",
        "2024-03-01",
    )
    scan = experiment.scans["1"]
    assert scan.type == "CT HEAD" and len(scan.resources["DICOM"].files) == 24
    query = "/data/services/import?project=PHANTOM&subject=IMPORTED&session=IMPORTED_CT1"
    again = requests.post(server.url + query, data=upload.read_bytes(), auth=("admin", "admin"), timeout=30)
    assert again.status_code == 409
    replaced = requests.post(
        server.url + query + "&overwrite=delete", data=upload.read_bytes(), auth=("admin", "admin"), timeout=30
    )
    assert replaced.text.strip() == "/data/archive/projects/PHANTOM/subjects/IMPORTED/experiments/IMPORTED_CT1"


# -- test hooks --------------------------------------------------------------------------------------


def test_request_log_records_every_request(server):
    response = get(server, f"{SESSION}/scans/1/resources/NIFTI/files/T1w.nii.gz")
    log = server.requests()
    started, finished = log[-1].pop("started"), log[-1].pop("finished")
    assert log[-1] == {
        "method": "GET",
        "path": f"{SESSION}/scans/1/resources/NIFTI/files/T1w.nii.gz",
        "query": "",
        "status": 200,
        "bytes": len(response.content),
        "user": "admin",
    }
    assert 0 <= finished - started < 30
    server.clear_requests()
    assert server.requests() == []


def test_fault_latency(server):
    server.set_faults(latency=0.4)
    started = time.monotonic()
    assert get(server, "/data/auth").status_code == 200
    assert time.monotonic() - started >= 0.4


def test_fault_drop_after_bytes(server):
    server.set_faults(drop_after_bytes=5000)
    with pytest.raises(requests.exceptions.RequestException):
        get(server, f"{SESSION}/scans/ALL/files?format=zip")
    zip_request = server.requests()[-1]
    assert zip_request["bytes"] == 5000 and zip_request["status"] == 200


def test_fault_error_for_matching_paths(server):
    server.set_faults(error={"status": 503, "path": r"/scans$", "count": 2})
    assert get(server, f"{SESSION}/resources").status_code == 200
    assert [get(server, f"{SESSION}/scans").status_code for _ in range(3)] == [503, 503, 200]
    server.set_faults(error={"status": 500, "path": "NIFTI"})
    assert [get(server, f"{SESSION}/scans/1/resources/NIFTI/files").status_code for _ in range(3)] == [500] * 3


def test_fault_refuse(server):
    server.set_faults(refuse=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        get(server, "/data/auth")
    server.clear_faults()
    assert get(server, "/data/auth").status_code == 200


def test_fault_stall(server):
    server.set_faults(stall=True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(server.url + "/data/auth", auth=("admin", "admin"), timeout=0.5)
    server.clear_faults()
    assert get(server, "/data/auth").status_code == 200


# -- custom data, demo data, benchmark data ---------------------------------------------------------


def test_custom_data_folder(server_factory, tmp_path):
    (tmp_path / "P1" / "SUBJ_A" / "EXP_A" / "scans" / "7" / "resources" / "RAW" / "deep").mkdir(parents=True)
    (tmp_path / "P1" / "SUBJ_A" / "EXP_A" / "scans" / "7" / "resources" / "RAW" / "deep" / "a.txt").write_text("a")
    (tmp_path / "P1" / "SUBJ_B" / "EXP_B").mkdir(parents=True)
    (tmp_path / "P1" / "project.json").write_text(json.dumps({"name": "Custom", "secondary_ID": "C1"}))
    (tmp_path / "P1" / "SUBJ_B" / "subject.json").write_text(json.dumps({"ID": "CUSTOM_S9"}))
    (tmp_path / "P1" / "SUBJ_A" / "EXP_A" / "experiment.json").write_text(
        json.dumps({"date": "2020-02-02", "xsiType": "xnat:petSessionData", "insert_date": "2020-02-03 10:00:00.0"})
    )
    custom = server_factory(data=tmp_path, test_hooks=False)
    assert custom.data_dir == tmp_path.resolve()
    subjects = get(custom, "/data/projects/P1/subjects?format=json").json()["ResultSet"]["Result"]
    assert [(s["label"], s["ID"]) for s in subjects] == [("SUBJ_A", "XNAT_S00001"), ("SUBJ_B", "CUSTOM_S9")]
    experiments = get(custom, "/data/experiments?format=json").json()["ResultSet"]["Result"]
    assert [(e["label"], e["ID"], e["xsiType"], e["date"]) for e in experiments] == [
        ("EXP_A", "XNAT_E00001", "xnat:petSessionData", "2020-02-02"),
        ("EXP_B", "XNAT_E00002", "xnat:mrSessionData", ""),
    ]
    with xnat.connect(custom.url, user="admin", password="admin", loglevel="ERROR") as session:
        scan = session.experiments["XNAT_E00001"].scans["7"]
        assert type(scan).__name__ == "PetScanData" and list(scan.resources["RAW"].files.keys()) == ["deep/a.txt"]
    (tmp_path / "P1" / "SUBJ_C").mkdir()  # folders added while the server runs show up
    deadline = time.monotonic() + 5
    while "SUBJ_C" not in get(custom, "/data/projects/P1/subjects?format=json").text:
        assert time.monotonic() < deadline, "new subject folder never appeared"
        time.sleep(0.2)
    assert get(custom, "/_test/requests").status_code == 404  # hooks are off unless asked for


def test_demo_dicom_converts_with_dcm2niix(server, tmp_path):
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        pytest.skip("dcm2niix is not installed")
    subprocess.run(
        [dcm2niix, "-o", str(tmp_path), "-f", "vol", str(server.data_dir / SESSION_DIR / "scans/2/resources/DICOM")],
        check=True,
        capture_output=True,
    )
    header = (tmp_path / "vol.nii").read_bytes()[:348]
    assert struct.unpack_from("<4h", header, 40) == (3, 64, 64, 20)
    nifti = gzip.decompress((server.data_dir / SESSION_DIR / "scans/1/resources/NIFTI/T1w.nii.gz").read_bytes())
    assert struct.unpack_from("<4h", nifti, 40) == (3, 64, 64, 16) and len(nifti) == 352 + 64 * 64 * 16 * 2


def peak_memory_kib(pid: int) -> int:
    """Return the process's peak resident memory (VmHWM) in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_big_zip_streams_in_constant_memory(server_factory, tmp_path):
    script = REPO / "scripts" / "make-bench-archive"
    subprocess.run([script, str(tmp_path), "--big-mb", "200", "--tree-files", "0"], check=True, capture_output=True)
    big = server_factory(data=tmp_path)
    path = "/data/projects/BENCH/subjects/BIG_01/experiments/BIG_01_MR1/scans/1/resources/DICOM/files?format=zip"
    before = peak_memory_kib(big.pid)
    received = 0
    with get(big, path, stream=True) as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        for chunk in response.iter_content(1024 * 1024):
            received += len(chunk)
    growth_mb = (peak_memory_kib(big.pid) - before) / 1024
    print(
        f"\nserver peak memory grew by {growth_mb:.1f} MB while streaming a {received / 1e6:.0f} MB zip",
        file=sys.stderr,
    )
    assert received > 200 * 1024 * 1024
    assert growth_mb < 50
