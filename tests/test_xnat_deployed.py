"""XNAT as deployed (see ../shared/xnat-protocol.md, "What a real XNAT does that breaks a naive client").

One archive with what real sites have and kind emulators hide: resource labels with spaces, parentheses and
non-ASCII, two resources sharing a label, an empty label, file names holding the experiment ID, a sub-folder
named like its scan ID, a stale listed size, a subject assessor that is not an image session, a public and a
private project. The server runs as such a site is set up: requireLogin=false (guests see public projects)
and ZIPs deflated by site setting. Everything is checked through the mount where a user would touch it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mounting import credentials_env, mounted, xnatfs, zip_downloads
from server_process import ServerProcess

from xnatfs import download
from xnatfs.transports import get_transport

EXPERIMENT_ID, EXPERIMENT_LABEL = "XNAT_E00031", "rexp01"
SESSION = f"/PUB/S1/{EXPERIMENT_LABEL}"
SCAN = f"{SESSION}/scans/1-T1_w/resources"
STALE_CONTENT = b"the catalog says 5 bytes, the file has more than that\n"


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def build_archive(root: Path) -> None:
    """The archive the tests of this module serve (layout: README, "Serving your own files")."""
    write(root / "PUB/project.json", json.dumps({"accessibility": "public", "secondary_ID": "HUB-PUB"}))
    session = root / "PUB/S1" / EXPERIMENT_LABEL
    write(session / "experiment.json", json.dumps({"ID": EXPERIMENT_ID, "date": "2024-05-01"}))
    scan = session / "scans/1"
    write(scan / "scan.json", json.dumps({"type": "T1 w"}))
    resources = scan / "resources"
    write(resources / "DICOM RAW/a(1).nii", b"paren" * 100)
    write(resources / "DICOM RAW/é (2).txt", "non-ASCII name\n")
    write(resources / "NIFTI/XNAT_E00031_T1.nii", b"named after the experiment ID\n")
    write(resources / "NIFTI/1/c.dcm", b"in a folder named like the scan\n")
    write(resources / "dup_a/same.txt", b"content of the first DUP\n")
    write(resources / "dup_a.json", json.dumps({"label": "DUP"}))
    write(resources / "dup_b/same.txt", b"content of the 2nd DUP!!\n")  # the same size
    write(resources / "dup_b.json", json.dumps({"label": "DUP"}))
    write(resources / "unlabelled/e.txt", b"a resource without a label\n")
    write(resources / "unlabelled.json", json.dumps({"label": ""}))
    write(resources / "STALE/grow.txt", STALE_CONTENT)
    write(resources / "STALE.json", json.dumps({"listed_sizes": {"grow.txt": 5}}))
    variables = root / "PUB/S1/SV1"
    write(variables / "experiment.json", json.dumps({"ID": "XNAT_E00032", "xsiType": "xnat:subjectVariablesData"}))
    write(variables / "resources/NOTES/notes.txt", b"subject notes\n")
    write(root / "PRIV/S2/E2/experiment.json", json.dumps({"ID": "XNAT_E00040"}))
    write(root / "PRIV/S2/E2/scans/1/resources/DICOM/x.dcm", b"private data\n")
    write(root / "PRIV/S2/E2/scans/1/resources/DICOM/y.dcm", b"more private data\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A public-site server of the archive above: requireLogin=false, ZIPs deflated by site setting,
    checksums off (no digests in listings: two files of one size look alike)."""
    root = tmp_path_factory.mktemp("deployed")
    build_archive(root)
    options = ["--no-require-login", "--zip-compression", "6", "--no-checksums"]
    with ServerProcess(data=root, extra_args=options) as server:
        yield server


@pytest.fixture
def deployed(site):
    yield from site.fresh()


def api_get(server, path: str, auth: bool = True, **params) -> requests.Response:
    return requests.get(
        server.url + path, params=params, auth=(server.user, server.password) if auth else None, timeout=10
    )


def resource_ids(server) -> dict[str, str]:
    """{resource folder in the data layout: xnat_abstractresource_id}."""
    rows = api_get(server, f"/data/experiments/{EXPERIMENT_ID}/scans/1/resources", format="json").json()
    by_label: dict[str, list[str]] = {}
    for row in rows["ResultSet"]["Result"]:
        by_label.setdefault(row["label"], []).append(row["xnat_abstractresource_id"])
    return by_label


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the server behaves like XNAT ---------------------------------------------------------------------------


def test_server_matches_resource_segments_as_sent(deployed):
    base = f"/data/experiments/{EXPERIMENT_ID}/scans/1/resources"
    quoted = api_get(deployed, f"{base}/DICOM%20RAW/files", format="json")
    assert quoted.status_code == 200 and quoted.json()["ResultSet"]["Result"] == []
    assert api_get(deployed, f"{base}/DICOM%20RAW/files", format="zip").status_code == 404
    raw_id = resource_ids(deployed)["DICOM RAW"][0]
    names = [
        r["Name"] for r in api_get(deployed, f"{base}/{raw_id}/files", format="json").json()["ResultSet"]["Result"]
    ]
    assert sorted(names) == ["a(1).nii", "é (2).txt"]
    # A label selects every resource that has it; ALL is a label like any other.
    both = api_get(deployed, f"{base}/DUP/files", format="json").json()["ResultSet"]["Result"]
    assert len(both) == 2
    assert api_get(deployed, f"{base}/ALL/files", format="zip").status_code == 404
    assert api_get(deployed, "/data/experiments/XNAT_E00040/scans/ALL/files", format="zip").status_code == 200
    # A file path is decoded only when it holds %20 or %2B.
    assert api_get(deployed, f"{base}/{raw_id}/files/a(1).nii").content == b"paren" * 100
    assert api_get(deployed, f"{base}/{raw_id}/files/a%281%29.nii").status_code == 404
    assert api_get(deployed, f"{base}/{raw_id}/files/%C3%A9%20(2).txt").content == b"non-ASCII name\n"


def test_server_zip_names_are_rewritten_and_duplicates_break_the_zip(deployed):
    import io
    import zipfile

    ids = resource_ids(deployed)
    nifti = ids["NIFTI"][0]
    body = api_get(deployed, f"/data/experiments/{EXPERIMENT_ID}/scans/1/resources/{nifti}/files", format="zip")
    names = sorted(zipfile.ZipFile(io.BytesIO(body.content)).namelist())
    prefix = f"{EXPERIMENT_LABEL}/scans/1-T1_w/resources/NIFTI/files/"
    assert names == [prefix + "1-T1_w/c.dcm", prefix + f"{EXPERIMENT_LABEL}_T1.nii"]
    with pytest.raises(requests.RequestException):  # Java's "duplicate entry": the stream breaks off
        api_get(deployed, f"/data/experiments/{EXPERIMENT_ID}/scans/1/resources/DUP/files", format="zip")


def test_server_guest_access_and_subject_assessors(deployed):
    assert [r["ID"] for r in api_get(deployed, "/data/projects", auth=False, format="json").json()["ResultSet"][
        "Result"
    ]] == ["PUB"]  # fmt: skip
    assert api_get(deployed, "/data/experiments/XNAT_E00040/scans", auth=False, format="json").status_code == 404
    assert api_get(deployed, "/data/experiments/XNAT_E00040/scans", format="json").status_code == 200
    assert api_get(deployed, "/data/experiments/XNAT_E00032/scans", format="json").status_code == 404
    resources = api_get(deployed, "/data/experiments/XNAT_E00032/resources", format="json").json()
    assert [r["label"] for r in resources["ResultSet"]["Result"]] == ["NOTES"]
    assert api_get(deployed, "/data/projects", auth=False).status_code == 200
    assert requests.get(deployed.url + "/data/projects", auth=("admin", "wrong"), timeout=10).status_code == 401


def test_server_locks_an_account_after_failed_logins(tmp_path, server_factory):
    build_archive(tmp_path)
    own = server_factory(data=tmp_path, extra_args=["--max-failed-logins", "3", "--lockout-seconds", "1.5"])
    for _ in range(3):
        assert requests.get(own.url + "/data/auth", auth=("admin", "wrong"), timeout=10).status_code == 401
    assert requests.get(own.url + "/data/auth", auth=("admin", "admin"), timeout=10).status_code == 401  # locked
    time.sleep(1.6)
    assert requests.get(own.url + "/data/auth", auth=("admin", "admin"), timeout=10).status_code == 200


# -- the mount ----------------------------------------------------------------------------------------------


def test_mount_shows_and_reads_awkward_labels_duplicates_and_renamed_zip_entries(deployed, tmp_path):
    ids = resource_ids(deployed)
    dup_low, dup_high = sorted(ids["DUP"], key=int)
    empty = ids[""][0]
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    data = deployed.data_dir / "PUB/S1" / EXPERIMENT_LABEL / "scans/1/resources"
    expected = {
        "DICOM RAW/files/a(1).nii": data / "DICOM RAW/a(1).nii",
        "DICOM RAW/files/é (2).txt": data / "DICOM RAW/é (2).txt",
        "NIFTI/files/XNAT_E00031_T1.nii": data / "NIFTI/XNAT_E00031_T1.nii",
        "NIFTI/files/1/c.dcm": data / "NIFTI/1/c.dcm",
        f"{empty}/files/e.txt": data / "unlabelled/e.txt",
    }
    # Which folder shows which DUP is decided by the resource IDs (the lowest keeps the label).
    folders = {dup_low: "DUP", dup_high: f"DUP~{dup_high}"}
    for folder_name in ("dup_a", "dup_b"):
        content = (data / folder_name / "same.txt").read_bytes()
        base = f"/data/experiments/{EXPERIMENT_ID}/scans/1/resources"
        rid = next(i for i in ids["DUP"] if api_get(deployed, f"{base}/{i}/files/same.txt").content == content)
        expected[f"{folders[rid]}/files/same.txt"] = data / folder_name / "same.txt"
    deployed.clear_requests()
    with mounted(deployed.url, mnt, cache, credentials_env(deployed)):
        names = sorted(os.listdir(mnt + SCAN))
        assert names == sorted(["DICOM RAW", "DUP", f"DUP~{dup_high}", "NIFTI", empty, "STALE"])
        for relative, source in expected.items():
            path = f"{mnt}{SCAN}/{relative}"
            assert os.stat(path).st_size == source.stat().st_size, relative
            assert subprocess.run(["cat", path], capture_output=True, check=True).stdout == source.read_bytes()
    zips = [r for r in deployed.requests() if "format=zip" in r["query"]]
    assert zips and all("compression=0" in r["query"] for r in zips)  # the site deflates; we ask it not to
    assert zip_downloads(deployed.requests()) == zips  # every file came out of its resource's ZIP
    assert all("/resources/DUP" not in r["path"] and "%20" not in r["path"] for r in deployed.requests())


def test_mount_walks_subject_assessors(deployed, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    with mounted(deployed.url, mnt, cache, credentials_env(deployed)):
        result = subprocess.run(["find", mnt + "/PUB"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert os.listdir(mnt + "/PUB/S1/SV1") == ["resources"]
        assert read(mnt + "/PUB/S1/SV1/resources/NOTES/files/notes.txt") == b"subject notes\n"


def test_mount_stale_size_the_bytes_win(deployed, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    path = f"{SCAN}/STALE/files/grow.txt"
    with mounted(deployed.url, mnt, cache, credentials_env(deployed)):
        assert os.stat(mnt + path).st_size == 5  # what the catalog says, until the bytes are seen
        assert subprocess.run(["cat", mnt + path], capture_output=True, check=True).stdout == STALE_CONTENT
        assert os.stat(mnt + path).st_size == len(STALE_CONTENT)  # visible at once
        assert read(mnt + path) == STALE_CONTENT


def test_transport_stale_size_updates_the_listing(deployed, tmp_path):
    opts = {"user": deployed.user, "password": deployed.password, "cache_dir": str(tmp_path / "cache")}
    changed = []
    with get_transport(deployed.url, opts=opts) as transport:
        transport.add_change_listener(changed.append)
        path = f"{SCAN}/STALE/files/grow.txt"
        assert transport.stat(path).size == 5
        with transport.open(path) as f:
            assert f.read() == STALE_CONTENT
        assert transport.stat(path).size == len(STALE_CONTENT)
        assert [e.size for e in transport.listdir(f"{SCAN}/STALE/files")] == [len(STALE_CONTENT)]
        assert changed == [path]
        transport.invalidate()  # a fresh listing still says 5: the learned size stays
        assert transport.stat(path).size == len(STALE_CONTENT)


def test_expired_session_on_a_public_site_is_not_served_as_guest(deployed, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    with mounted(deployed.url, mnt, cache, credentials_env(deployed), "--ttl", "1"):
        assert sorted(os.listdir(mnt)) == ["PRIV", "PUB"]
        files = f"{mnt}/PRIV/S2/E2/scans/1/resources/DICOM/files"
        assert sorted(os.listdir(files)) == ["x.dcm", "y.dcm"]
        deployed.expire_sessions()
        deployed.clear_requests()
        time.sleep(1.2)  # the listings expire too
        assert sorted(os.listdir(mnt)) == ["PRIV", "PUB"]
        assert read(f"{files}/x.dcm") == b"private data\n"
        users = {r["user"] for r in deployed.requests()}
        assert users == {"admin"}, users


def test_uploads_store_the_intended_names(tmp_path, server_factory):
    build_archive(tmp_path / "data")
    own = server_factory(data=tmp_path / "data")
    opts = {"user": own.user, "password": own.password, "cache_dir": str(tmp_path / "cache")}
    stored = tmp_path / "data/PUB/S1" / EXPERIMENT_LABEL / "scans/1/resources/DICOM RAW"
    with get_transport(own.url, mode="w", opts=opts) as transport:
        for name in ("b(1).nii", "with space+plus.txt", "sub dir/é ü.txt"):
            with transport.open(f"{SCAN}/DICOM RAW/files/{name}", "w") as f:
                f.write(name.encode())
            assert (stored / name).read_bytes() == name.encode()
            assert read_transport(transport, f"{SCAN}/DICOM RAW/files/{name}") == name.encode()
        with pytest.raises(ValueError):  # XNAT would store it under its percent-encoded name
            transport.open(f"{SCAN}/DICOM RAW/files/é.txt", "w")


def read_transport(transport, path: str) -> bytes:
    with transport.open(path) as f:
        return f.read()


def test_rejected_password_is_not_retried_in_a_loop(tmp_path, server_factory):
    build_archive(tmp_path / "data")
    own = server_factory(data=tmp_path / "data", extra_args=["--max-failed-logins", "6"])
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    os.makedirs(mnt)
    wrong = credentials_env(own, XNAT_PASS="wrong")
    result = xnatfs("mount", own.url, mnt, "--cache-dir", cache, "--timeout", "5", env=wrong)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "admin" in result.stderr and "wrong" not in result.stderr
    assert len([r for r in own.requests() if r["status"] == 401]) <= 2
    own.unlock()
    own.clear_requests()
    with mounted(own.url, mnt, cache, credentials_env(own, XNATFS_AUTH_RETRY_SECONDS="3"), "--ttl", "0.5"):
        files = f"{mnt}/PRIV/S2/E2/scans/1/resources/DICOM/files"
        names = sorted(os.listdir(files))
        own.set_password("changed")  # the mount's password stops working
        own.expire_sessions()
        own.clear_requests()
        started = time.monotonic()
        for _ in range(20):  # a busy reader, retrying
            with pytest.raises(OSError) as info:
                read(f"{files}/{names[0]}")
            assert info.value.errno == errno.EACCES
        assert time.monotonic() - started < 2.5
        refused = [r for r in own.requests() if r["status"] == 401]
        assert len(refused) == 1, refused
        own.set_password(own.password)
        time.sleep(3.2)  # the wait after the refusal ends: the next read tries again, and works
        assert read(f"{files}/{names[0]}") == b"private data\n"
        assert len([r for r in own.requests() if r["status"] == 401]) == 1


def test_download_command_and_api_with_all_and_awkward_labels(deployed, tmp_path, monkeypatch):
    env = credentials_env(deployed)
    dup_low, dup_high = sorted(resource_ids(deployed)["DUP"], key=int)
    deployed.clear_requests()
    result = xnatfs("download", deployed.url, "PRIV", "E2", "--resource", "ALL", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(Path(result.stdout.strip()) / "scans/1/resources/DICOM/files")) == ["x.dcm", "y.dcm"]
    zips = [r for r in deployed.requests() if "format=zip" in r["query"]]
    assert [r["path"] for r in zips] == ["/data/experiments/XNAT_E00040/scans/ALL/files"]
    # ALL with two resources of one label in one scan: those come one by one, named as on the mount.
    result = xnatfs(
        "download", deployed.url, "PUB", EXPERIMENT_LABEL, "--resource", "ALL", "--dest", str(tmp_path), env=env
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    resources = Path(result.stdout.strip()) / "scans/1-T1_w/resources"
    assert (resources / "NIFTI/files/rexp01_T1.nii").read_bytes() == b"named after the experiment ID\n"
    assert (resources / "STALE/files/grow.txt").read_bytes() == STALE_CONTENT
    duplicates = {(resources / name / "files/same.txt").read_bytes() for name in ("DUP", f"DUP~{dup_high}")}
    assert len(duplicates) == 2
    result = xnatfs(
        "download", deployed.url, "PUB", EXPERIMENT_LABEL, "--resource", "DICOM RAW", "--dest", str(tmp_path / "raw"),
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    raw = Path(result.stdout.strip()) / "scans/1-T1_w/resources/DICOM RAW/files"
    assert sorted(p.name for p in raw.iterdir()) == ["a(1).nii", "é (2).txt"]
    zips = [r for r in deployed.requests() if "format=zip" in r["query"]]
    assert all(r["status"] == 200 and "compression=0" in r["query"] for r in zips)
    assert not any("ALL/resources/ALL" in r["path"] or "DICOM" in r["path"] for r in zips)

    monkeypatch.setattr(download, "XNAT_URL", deployed.url)
    monkeypatch.setattr(download, "BASE_IMAGES_DOWNLOAD_DIR", str(tmp_path / "images"))
    headers = {"Authorization": requests.auth._basic_auth_str(deployed.user, deployed.password)}
    for resource_type, expected in (("ALL", "NIFTI/files/rexp01_T1.nii"), ("DICOM RAW", "DICOM RAW/files/a(1).nii")):
        folder = asyncio.run(
            download.download_and_unzip_images("HUB-PUB", EXPERIMENT_LABEL, "jdoe", "scan", resource_type, headers)
        )
        assert (Path(folder) / "scans/1-T1_w/resources" / expected).is_file()
    zips = [r for r in deployed.requests() if "format=zip" in r["query"]]
    assert all(r["status"] == 200 and "compression=0" in r["query"] for r in zips)
