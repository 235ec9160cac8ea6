"""XnatTransport through the transport interface: derived methods, and writes that upload and verify."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import xnat

from xnatfs.exceptions import UploadError
from xnatfs.transports import AbstractTransport, get_transport

SESSION = "/DEMO/DEMO_001/DEMO_001_MR1"
EXTRA = f"{SESSION}/resources/EXTRA/files"  # a session-level resource of the demo archive


@pytest.fixture
def own(server_factory):
    return server_factory()  # an archive of its own: these tests add files


@contextmanager
def transport(server, tmp_path, mode: str = "r", timeout: float = 10) -> Iterator[AbstractTransport]:
    opts = {"user": server.user, "password": server.password, "cache_dir": str(tmp_path / "cache"), "timeout": timeout}
    t = get_transport(server.url, mode=mode, opts=opts)
    try:
        yield t
    finally:
        t.close()


def server_file(server, resource_label: str, name: str) -> bytes | None:
    """The file's bytes as the xnat client sees them (None if absent)."""
    with xnat.connect(server.url, user=server.user, password=server.password) as session:
        experiment = session.projects["DEMO"].subjects["DEMO_001"].experiments["DEMO_001_MR1"]
        files = experiment.resources[resource_label].files
        if name not in files:
            return None
        with files[name].open() as f:
            return f.read()


def test_walk_exists_isfile_info(server, tmp_path):
    with transport(server, tmp_path) as t:
        walked = {root: (dirs, files) for root, dirs, files in t.walk(SESSION)}
        assert f"{SESSION}/scans" in walked and EXTRA in walked
        name = walked[EXTRA][1][0]
        assert t.exists(f"{EXTRA}/{name}") and t.isfile(f"{EXTRA}/{name}")
        assert t.exists(SESSION) and not t.isfile(SESSION)
        assert not t.exists(f"{EXTRA}/no-such-file")
        assert "\n" not in t.info(f"{EXTRA}/{name}") and name in t.info(f"{EXTRA}/{name}")
        assert t.downloads == 0  # none of that fetched content


def test_write_uploads_verifies_and_reads_back(own, tmp_path):
    with transport(own, tmp_path, mode="w") as t:
        data = hashlib.sha256(b"xnatfs").digest() * 1000
        with t.open(f"{EXTRA}/notes/result.bin", "w") as f:
            f.write(data)
        assert server_file(own, "EXTRA", "notes/result.bin") == data  # seen by an independent client
        assert t.isfile(f"{EXTRA}/notes/result.bin")  # our own listing shows it at once
        with t.open(f"{EXTRA}/notes/result.bin") as f:
            assert f.read() == data
        with pytest.raises(FileExistsError):
            t.open(f"{EXTRA}/notes/result.bin", "x")
        with t.open(f"{EXTRA}/notes/result.bin", "a") as f:
            f.write(b"more")
        assert server_file(own, "EXTRA", "notes/result.bin") == data + b"more"
        with pytest.raises(PermissionError):
            t.open(f"{SESSION}/not-in-a-resource.txt", "w")


def test_an_interrupted_write_uploads_nothing(own, tmp_path):
    with transport(own, tmp_path, mode="w") as t:
        with pytest.raises(RuntimeError):
            with t.open(f"{EXTRA}/half.bin", "w") as f:
                f.write(b"half of it")
                raise RuntimeError("the writer failed")
        assert server_file(own, "EXTRA", "half.bin") is None


def test_a_failed_upload_raises_and_keeps_the_data(own, tmp_path):
    with transport(own, tmp_path, mode="w", timeout=3) as t:
        data = b"precious results\n" * 100
        try:
            own.set_faults(error={"status": 500, "path": r"/files/lost\.txt$"})
            f = t.open(f"{EXTRA}/lost.txt", "w")
            f.write(data)
            with pytest.raises(UploadError) as info:
                f.close()
            assert "500" in str(info.value) and info.value.kept_at in str(info.value)
            with open(info.value.kept_at, "rb") as kept:
                assert kept.read() == data
            os.unlink(info.value.kept_at)
            assert server_file(own, "EXTRA", "lost.txt") is None
        finally:
            own.clear_faults()


def test_read_only_transport_refuses_writes(server, tmp_path):
    with transport(server, tmp_path) as t:
        with pytest.raises(PermissionError):
            t.open(f"{EXTRA}/x.txt", "w")


def test_write_after_the_session_expired(own, tmp_path):
    with transport(own, tmp_path, mode="w", timeout=5) as t:
        data = b"x" * 300_000
        assert t.exists(EXTRA)  # logged in
        own.expire_sessions()
        own.clear_requests()
        with t.open(f"{EXTRA}/after-expiry.bin", "w") as f:
            f.write(data)
        assert server_file(own, "EXTRA", "after-expiry.bin") == data
        puts = [r["status"] for r in own.requests() if r["method"] == "PUT" and "/files/" in r["path"]]
        assert puts == [200]  # the credentials went along: the expired session was no obstacle
