"""The download service API and the machinery under it, against the embedded server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time

import pytest
import requests
from mounting import xnatfs

from xnatfs import download
from xnatfs.cache import Cache
from xnatfs.client import XnatClient
from xnatfs.exceptions import (
    AuthenticationError,
    ConnectionFailedError,
    NotFoundError,
    ServerError,
)
from xnatfs.transports.xnat import XnatTransport


def auth_headers(server) -> dict[str, str]:
    token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def rows(server, path: str, **params) -> list[dict]:
    response = requests.get(server.url + path, params={"format": "json", **params}, auth=(server.user, server.password))
    response.raise_for_status()
    return response.json()["ResultSet"]["Result"]


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """The API configured for the embedded server; returns (project row with a secondary ID, experiment row)."""
    monkeypatch.setattr(download, "XNAT_URL", server.url)
    monkeypatch.setattr(download, "BASE_IMAGES_DOWNLOAD_DIR", str(tmp_path / "images"))
    project = next(p for p in rows(server, "/data/projects") if p.get("secondary_ID"))
    experiment = rows(server, f"/data/projects/{project['ID']}/experiments")[0]
    return project, experiment


def test_format_download_url(monkeypatch):
    monkeypatch.setattr(download, "XNAT_URL", "https://x.org")
    assert (
        download.format_download_url("P 1", "S", "E/1", "Scan", "ALL")
        == "https://x.org/data/projects/P%201/subjects/S/experiments/E%2F1/scans/ALL/files?format=zip&compression=0"
    )
    assert "/assessors/ALL/resources/NIFTI/files?format=zip&compression=0" in download.format_download_url(
        "P", "S", "E", "ASSESSOR"
    )
    with pytest.raises(ValueError):
        download.format_download_url("P", "S", "E", "session")


def test_download_and_unzip_images_end_to_end(server, hub, tmp_path):
    project, experiment = hub
    folder = asyncio.run(
        download.download_and_unzip_images(
            project["secondary_ID"], experiment["label"], "jdoe", "scan", "DICOM", auth_headers(server)
        )
    )
    assert folder == os.path.realpath(tmp_path / "images" / "jdoe" / experiment["label"])
    got = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            got[os.path.relpath(path, folder)] = hashlib.md5(open(path, "rb").read()).hexdigest()
    assert got and all(p.startswith("scans/") and "/resources/DICOM/files/" in p for p in got)
    for scan in rows(server, f"/data/experiments/{experiment['ID']}/scans"):
        try:
            files = rows(server, f"/data/experiments/{experiment['ID']}/scans/{scan['ID']}/resources/DICOM/files")
        except requests.HTTPError:
            continue
        for f in files:
            matches = [p for p in got if p.startswith(f"scans/{scan['ID']}-") or p.startswith(f"scans/{scan['ID']}/")]
            assert any(got[p] == f["digest"] for p in matches), f["Name"]
    assert not [n for n in os.listdir(tmp_path / "images" / "jdoe") if n.endswith(".zip")]


def test_download_and_unzip_images_errors(server, hub):
    project, experiment = hub
    headers = auth_headers(server)
    run = asyncio.run
    with pytest.raises(NotFoundError):
        run(download.download_and_unzip_images("NO-SUCH-HUB", experiment["label"], "u", "scan", "DICOM", headers))
    with pytest.raises(NotFoundError):
        run(download.download_and_unzip_images(project["secondary_ID"], "NO_SUCH", "u", "scan", "DICOM", headers))
    with pytest.raises(NotFoundError):
        run(
            download.download_and_unzip_images(
                project["secondary_ID"], experiment["label"], "u", "scan", "NOPE", headers
            )
        )
    for bad in ("../x", "..", "a/b", ""):
        with pytest.raises(ValueError):
            run(
                download.download_and_unzip_images(
                    project["secondary_ID"], experiment["label"], bad, "scan", "DICOM", headers
                )
            )
    with pytest.raises(ValueError):
        run(download.download_and_unzip_images(project["secondary_ID"], "../../etc", "u", "scan", "DICOM", headers))


def test_download_does_not_block_the_event_loop(server, hub):
    project, experiment = hub
    server.set_faults(latency=0.3)
    ticks = []

    async def main():
        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        task = asyncio.create_task(ticker())
        await download.download_and_unzip_images(
            project["secondary_ID"], experiment["label"], "loop", "scan", "DICOM", auth_headers(server)
        )
        task.cancel()

    asyncio.run(main())
    # Each request waits 0.3 s at the server; a blocked loop would not have ticked meanwhile.
    assert len(ticks) >= 10


def test_download_file_streams_and_leaves_nothing_on_failure(server, hub, tmp_path):
    project, experiment = hub
    subject = rows(server, f"/data/projects/{project['ID']}/subjects")
    subject_id = next(
        s["ID"]
        for s in subject
        if any(
            e["ID"] == experiment["ID"]
            for e in rows(server, f"/data/projects/{project['ID']}/subjects/{s['ID']}/experiments")
        )
    )
    url = download.format_download_url(project["ID"], subject_id, experiment["ID"], "scan", "DICOM")
    dest = str(tmp_path / "d.zip")
    assert download.download_file(url, dest, auth_headers(server)) == dest
    assert os.path.getsize(dest) > 1000

    missing = str(tmp_path / "missing.zip")
    with pytest.raises(NotFoundError):
        download.download_file(url.replace("/DICOM/", "/NO_SUCH/"), missing, auth_headers(server))
    assert not os.path.exists(missing)

    server.set_faults(drop_after_bytes=5000)
    dropped = str(tmp_path / "dropped.zip")
    with pytest.raises(ConnectionFailedError):
        download.download_file(url, dropped, auth_headers(server))
    assert not os.path.exists(dropped)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".xnatfs-partial")] == []
    server.clear_faults()

    server.set_faults(error={"status": 500, "path": "/files"})
    with pytest.raises(ServerError):
        download.download_file(url, str(tmp_path / "e.zip"), auth_headers(server))
    server.clear_faults()
    with pytest.raises(AuthenticationError):
        download.download_file(url, str(tmp_path / "a.zip"), {"Authorization": "Basic eDp5"})


def test_unzip_file_renames_top_folder_and_refuses_escapes(server, hub, tmp_path):
    import zipfile

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("E1/scans/1/resources/DICOM/files/a.dcm", b"abc")
    out = tmp_path / "out"
    path = download.unzip_file(str(good), str(out), "renamed")
    assert open(os.path.join(path, "scans/1/resources/DICOM/files/a.dcm"), "rb").read() == b"abc"
    assert not good.exists()

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("E1/ok.txt", b"fine")
        z.writestr("E1/../../escaped.txt", b"evil")
    with pytest.raises(ValueError):
        download.unzip_file(str(evil), str(out), "evil")
    assert evil.exists()
    assert not (out / "evil").exists() and not (tmp_path / "escaped.txt").exists()
    assert sorted(os.listdir(out)) == ["renamed"]
    with pytest.raises(ValueError):
        download.unzip_file(str(evil), str(out), "../outside")
    with pytest.raises(FileNotFoundError):
        download.unzip_file(str(tmp_path / "nope.zip"), str(out), "x")


def test_session_relogs_in_after_expiry_and_retries_5xx(server):
    session = XnatClient(server.url, server.user, server.password, timeout=10)
    assert session.get_rows("/data/projects")
    server.expire_sessions()
    server.clear_requests()
    assert session.get_rows("/data/projects")
    # The credentials go along with every request: the expired session is replaced without a refusal.
    assert [r["status"] for r in server.requests()] == [200]
    server.set_faults(error={"status": 503, "path": "^/data/projects$", "count": 2})
    assert session.get_rows("/data/projects")
    server.set_faults(error={"status": 403, "path": "^/data/projects$"})
    with pytest.raises(PermissionError):
        session.get_rows("/data/projects")
    server.clear_faults()
    with pytest.raises(AuthenticationError):
        XnatClient(server.url, server.user, "wrong", timeout=5).login()
    session.close()


def test_login_within_bounds_reaching_the_server_not_reading_its_answer(server):
    client = XnatClient(server.url, server.user, server.password, timeout=30)
    try:
        for faults, error in (({"refuse": True}, ConnectionFailedError),
                              ({"error": {"status": 503, "path": "JSESSION"}}, ServerError)):  # fmt: skip
            server.set_faults(**faults)
            started = time.monotonic()
            with pytest.raises(error):
                client.login(within=1)
            took = time.monotonic() - started
            assert took < 5, took  # not the client's 30 s
            server.clear_faults()
        # A server that took the request is given the whole timeout to answer it.
        server.set_faults(latency=2)
        started = time.monotonic()
        client.login(within=0.5)
        took = time.monotonic() - started
        assert took >= 2, took
    finally:
        server.clear_faults()
        client.close()


def test_streamed_member_is_identical_and_arrives_before_the_whole_zip(server, tmp_path):
    transport = XnatTransport(opts={"url": server.url, "user": server.user, "password": server.password,
                                    "cache": Cache(str(tmp_path / "cache")), "timeout": 20})  # fmt: skip
    scan_files = None
    for root, _dirs, files in transport.walk("/"):
        if root.endswith("/resources/DICOM/files") and "/scans/" in root and len(files) > 4:
            scan_files = (root, sorted(files))
            break
    assert scan_files
    root, files = scan_files
    server.set_faults(throttle=200_000)
    first = transport.fetch(f"{root}/{files[0]}")
    entry = transport.stat(f"{root}/{files[0]}")
    assert os.path.getsize(first) == entry.size
    assert hashlib.md5(open(first, "rb").read()).hexdigest() == entry.ref.digest
    # The rest is still on its way: the whole resource is not published yet.
    assert ".staging" in first
    server.clear_faults()
    last = transport.fetch(f"{root}/{files[-1]}")
    assert hashlib.md5(open(last, "rb").read()).hexdigest() == transport.stat(f"{root}/{files[-1]}").ref.digest
    transport.close()


def test_download_command(server, tmp_path):
    project, experiment = None, None
    for p in rows(server, "/data/projects"):
        exps = rows(server, f"/data/projects/{p['ID']}/experiments")
        if exps:
            project, experiment = p, exps[0]
            break
    env = dict(os.environ, XNAT_USER=server.user, XNAT_PASS=server.password)
    result = xnatfs("download", server.url, project["ID"], experiment["label"], "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    folder = result.stdout.strip()
    assert folder == str(tmp_path / experiment["label"])
    assert any(n.endswith(".dcm") for _r, _d, names in os.walk(folder) for n in names)
    assert result.stderr == ""  # no progress bar when not on a terminal
    bad = xnatfs("download", server.url, project["ID"], "NO_SUCH", "--dest", str(tmp_path), env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "NO_SUCH" in bad.stderr


def test_concurrent_fetches_share_one_download(server, tmp_path):
    transport = XnatTransport(opts={"url": server.url, "user": server.user, "password": server.password,
                                    "cache": Cache(str(tmp_path / "cache")), "timeout": 20})  # fmt: skip
    for root, _dirs, files in transport.walk("/"):
        if root.endswith("/resources/DICOM/files") and "/scans/" in root and len(files) > 4:
            break
    server.clear_requests()
    threads = [threading.Thread(target=transport.fetch, args=(f"{root}/{name}",)) for name in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum("format=zip" in (r.get("query") or "") for r in server.requests()) == 1
    transport.close()


def test_parts_merge_whole_folders_and_never_replace_a_file(tmp_path):
    """Each ZIP of a download is extracted apart, then merged: a folder the result lacks moves whole,
    and a file two ZIPs both hold is refused (the first stays as it was)."""
    first, second, target = tmp_path / "part-0", tmp_path / "part-1", tmp_path / "content"
    (first / "E/scans/1/resources/DICOM/files").mkdir(parents=True)
    (first / "E/scans/1/resources/DICOM/files/a.dcm").write_bytes(b"a")
    (second / "E/scans/2/resources/DICOM/files").mkdir(parents=True)
    (second / "E/scans/2/resources/DICOM/files/b.dcm").write_bytes(b"b")
    target.mkdir()
    inode = (first / "E/scans").stat().st_ino
    download._merge(str(first), str(target))
    download._merge(str(second), str(target))
    assert (target / "E/scans").stat().st_ino == inode  # moved in one rename, not file by file
    assert (target / "E/scans/1/resources/DICOM/files/a.dcm").read_bytes() == b"a"
    assert (target / "E/scans/2/resources/DICOM/files/b.dcm").read_bytes() == b"b"
    assert not first.exists() and not second.exists()
    (second / "E/scans/1/resources/DICOM/files").mkdir(parents=True)
    (second / "E/scans/1/resources/DICOM/files/a.dcm").write_bytes(b"other")
    with pytest.raises(download.UnsafeArchiveError, match="two ZIPs hold 'E/scans/1/resources/DICOM/files/a.dcm'"):
        download._merge(str(second), str(target))
    assert (target / "E/scans/1/resources/DICOM/files/a.dcm").read_bytes() == b"a"
