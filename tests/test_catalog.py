"""The persistent catalog, bulk listings and read-ahead, through real mounts of `xnatfs serve`.

The tree is the benchmark's (scripts/make-bench-archive): project TREE, 10 subjects x 2 sessions x
5 scans, one DICOM resource per scan, here with one small file per scan.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from mounting import credentials_env, force_unmount, mounted, xnatfs, zip_downloads
from server_process import ServerProcess

from xnatfs.catalog import Catalog
from xnatfs.server.bench import make_bench_archive
from xnatfs.transports import get_transport
from xnatfs.transports.base import CONNECT_CHECK_SECONDS

TREE_FILES = 100  # one per scan
EXPERIMENTS = 20


@pytest.fixture(scope="module")
def tree_server(tmp_path_factory):
    data = make_bench_archive(tmp_path_factory.mktemp("tree"), big_mb=0, tree_files=TREE_FILES)
    with ServerProcess(data=data) as server:
        yield server


@pytest.fixture
def tree(tree_server):
    yield from tree_server.fresh()


def walk(mountpoint: str) -> list[str]:
    """Return every path below the mount as `find -ls` saw it (also checks that find succeeded)."""
    result = subprocess.run(["find", mountpoint, "-ls"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return sorted(line.split()[-1] for line in result.stdout.splitlines())


def listings(server: ServerProcess) -> list[dict]:
    return [r for r in server.requests() if "format=json" in (r.get("query") or "")]


def cat(path: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", path], capture_output=True, timeout=timeout)


def dicom_files(paths: list[str]) -> list[str]:
    return [p for p in paths if p.endswith(".dcm")]


def test_find_lists_in_bulk_three_requests_per_experiment_and_downloads_nothing(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    with mounted(tree.url, mnt, cache, credentials_env(tree)):
        found = walk(mnt)
    assert len(dicom_files(found)) == TREE_FILES
    made = listings(tree)
    levels = Counter()
    per_experiment = Counter()
    for request in made:
        path, query = request["path"], request["query"]
        parts = path.strip("/").split("/")
        if parts[:2] == ["data", "experiments"] and len(parts) == 4:
            per_experiment[parts[2]] += 1
            levels[parts[3] + ("+all" if "all=true" in query else "")] += 1
        else:
            levels[path] += 1
    assert levels == {
        "/data/projects": 1,
        "/data/projects/TREE/subjects": 1,
        "/data/projects/TREE/experiments": 1,  # all experiments with their subjects, in one request
        "scans": EXPERIMENTS,
        "resources+all": EXPERIMENTS,  # all resources of a session, scans' included
        "files+all": EXPERIMENTS,  # all files of a session
    }, levels
    assert len(per_experiment) == EXPERIMENTS and set(per_experiment.values()) == {3}
    assert zip_downloads(tree.requests()) == []  # listing never downloads content


def test_one_unreadable_catalog_falls_back_to_per_resource_listings(server_factory, tmp_path):
    data = make_bench_archive(tmp_path / "data", big_mb=0, tree_files=TREE_FILES)
    session = data / "TREE" / "TREE_01" / "TREE_01_MR1"
    (session / "scans" / "3" / "resources" / "DICOM.json").write_text(json.dumps({"catalog_unreadable": True}))
    server = server_factory(data=data)
    env = credentials_env(server)
    auth = (server.user, server.password)
    rows = requests.get(
        f"{server.url}/data/projects/TREE/experiments", params={"format": "json"}, auth=auth, timeout=10
    ).json()["ResultSet"]["Result"]
    eid = next(r["ID"] for r in rows if r["label"] == "TREE_01_MR1")
    bulk = requests.get(
        f"{server.url}/data/experiments/{eid}/files", params={"all": "true", "format": "json"}, auth=auth
    )
    assert bulk.status_code == 404  # as XNAT: one unreadable catalog fails the whole bulk listing
    server.clear_requests()
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    with mounted(server.url, mnt, cache, env, "--timeout", "5"):
        found = walk(mnt)
        scans = f"{mnt}/TREE/TREE_01/TREE_01_MR1/scans"
        for scan in ("1", "2", "4", "5"):
            (name,) = os.listdir(f"{scans}/{scan}/resources/DICOM/files")
            source = session / "scans" / scan / "resources" / "DICOM" / name
            assert cat(f"{scans}/{scan}/resources/DICOM/files/{name}").stdout == source.read_bytes()
        assert not os.path.exists(f"{scans}/3/resources/DICOM/files/00001.dcm")
    assert len(dicom_files(found)) == TREE_FILES - 1
    per_resource = [r for r in listings(server) if "/resources/" in r["path"] and r["path"].endswith("/files")]
    assert {r["path"].split("/")[3] for r in per_resource} == {eid}  # the fallback stays in that session
    by_scan = Counter(r["path"].split("/")[5] for r in per_resource)
    assert set(by_scan) == {"1", "2", "3", "4", "5"} and all(by_scan[s] == 1 for s in "1245"), by_scan


def peak_in_flight(made: list[dict]) -> int:
    """Return the most requests of ``made`` the server was handling at one time."""
    events = sorted([(r["started"], 1) for r in made] + [(r["finished"], -1) for r in made])
    in_flight = peak = 0
    for _when, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return peak


def test_read_ahead_keeps_at_most_listing_jobs_requests_in_flight(tree, tmp_path):
    tree.set_faults(latency=0.1)
    mnt, env = str(tmp_path / "mnt"), credentials_env(tree)
    with mounted(tree.url, mnt, str(tmp_path / "cache1"), env, "--listing-jobs", "2"):
        walk(mnt)
    made = listings(tree)
    assert peak_in_flight(made) == 2  # one walk, and the read-ahead runs its listings in parallel
    assert len(made) == 3 + 3 * EXPERIMENTS  # read-ahead adds no request to the walk's
    tree.clear_requests()
    with mounted(tree.url, mnt, str(tmp_path / "cache2"), env, "--listing-jobs", "2"):
        # Ten walks at once (one per subject) and the read-ahead: still two requests in flight at most.
        finds = [
            subprocess.Popen(["find", f"{mnt}/TREE/TREE_{n:02d}"], stdout=subprocess.DEVNULL) for n in range(1, 11)
        ]
        assert [f.wait(120) for f in finds] == [0] * 10
    assert peak_in_flight(listings(tree)) == 2


def test_remount_within_ttl_makes_no_listing_request_and_reads_from_the_cache(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = credentials_env(tree)
    with mounted(tree.url, mnt, cache, env):
        first = walk(mnt)
        some_file = dicom_files(first)[0]
        content = cat(some_file).stdout
    tree.clear_requests()
    with mounted(tree.url, mnt, cache, env):
        assert walk(mnt) == first
        assert cat(some_file).stdout == content
    assert listings(tree) == []
    assert zip_downloads(tree.requests()) == []


def test_corrupt_catalog_files_are_ignored_and_fetched_again(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = credentials_env(tree)
    with mounted(tree.url, mnt, cache, env):
        first = walk(mnt)
    catalog = Catalog(cache, f"xnat|{tree.url}|{tree.user}")
    root, project = Path(catalog.path_of("/")), Path(catalog.path_of("/TREE"))
    root.write_bytes(root.read_bytes()[: root.stat().st_size // 2])  # a partial write
    project.write_bytes(b"\x00garbage{{{")
    tree.clear_requests()
    with mounted(tree.url, mnt, cache, env):
        assert walk(mnt) == first
    assert sorted(r["path"] for r in listings(tree)) == ["/data/projects", "/data/projects/TREE/subjects"]
    assert json.loads(root.read_text())["key"] == "/" and json.loads(project.read_text())["key"] == "/TREE"


def walk_and_cache_one_file(tree, mnt: str, cache: str, env: dict) -> tuple:
    """Mount, walk the tree (its listings go into the catalog) and read one file; return the walk, the
    file read, a file of another resource (not read) and the content read."""
    with mounted(tree.url, mnt, cache, env):
        first = walk(mnt)
        cached, uncached = dicom_files(first)[0], dicom_files(first)[-1]
        content = cat(cached).stdout
    return first, cached, uncached, content


def test_server_down_mounts_from_the_catalog_serves_cached_data_and_reconnects(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = credentials_env(tree)
    first, cached, uncached, content = walk_and_cache_one_file(tree, mnt, cache, env)
    # Without a catalog, an unreachable server is the one-line error of before.
    tree.set_faults(refuse=True)
    os.makedirs(mnt, exist_ok=True)
    log_file = str(tmp_path / "offline.log")
    args = ("--timeout", "2", "--log-file", log_file)
    empty = xnatfs("mount", tree.url, mnt, "--cache-dir", str(tmp_path / "empty-cache"), *args, env=env)
    assert empty.returncode != 0 and empty.stderr.startswith("xnatfs: error: ")
    assert len(empty.stderr.strip().splitlines()) == 1
    try:
        # With the catalog to serve from, the mount does not wait out --timeout (default 30 s) first.
        started = time.monotonic()
        result = xnatfs("mount", tree.url, mnt, "--cache-dir", cache, "--log-file", log_file, env=env)
        assert result.returncode == 0 and "offline" in result.stderr, result.stderr
        took = time.monotonic() - started
        assert took < 10, took
        assert xnatfs("umount", mnt).returncode == 0
        result = xnatfs("mount", tree.url, mnt, "--cache-dir", cache, *args, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xnatfs: warning: ") and "offline" in lines[0], lines
        assert walk(mnt) == first
        assert cat(cached).stdout == content
        started = time.monotonic()
        failed = cat(uncached)
        assert failed.returncode != 0 and b"Input/output error" in failed.stderr
        assert time.monotonic() - started < 10  # --timeout 2, and a little for the retries
        tree.clear_faults()
        deadline = time.monotonic() + 30
        while (read := cat(uncached)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(1)
        assert read.returncode == 0, read.stderr
    finally:
        xnatfs("umount", mnt)
        force_unmount(mnt)


def test_a_slow_server_is_waited_for_although_the_catalog_could_serve(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = credentials_env(tree)
    walk_and_cache_one_file(tree, mnt, cache, env)
    # Slower than the ~3 s given to reaching the server, but it took the request: the mount waits, online.
    tree.set_faults(latency=CONNECT_CHECK_SECONDS + 1)
    try:
        started = time.monotonic()
        result = xnatfs("mount", tree.url, mnt, "--cache-dir", cache, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        took = time.monotonic() - started
        assert took > CONNECT_CHECK_SECONDS, took
    finally:
        tree.clear_faults()
        xnatfs("umount", mnt)
        force_unmount(mnt)


def test_offline_mount_never_contacts_the_server(tree, tmp_path):
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = credentials_env(tree)
    first, cached, uncached, content = walk_and_cache_one_file(tree, mnt, cache, env)
    tree.clear_requests()
    with mounted(tree.url, mnt, cache, env, "--offline"):
        assert walk(mnt) == first
        assert cat(cached).stdout == content
        failed = cat(uncached, timeout=10)
        assert failed.returncode != 0 and b"Input/output error" in failed.stderr
    assert tree.requests() == []
    empty = xnatfs("mount", tree.url, mnt, "--offline", "--cache-dir", str(tmp_path / "other"), env=env)
    assert empty.returncode != 0 and "no catalog" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1


def test_two_users_sharing_a_cache_directory_see_their_own_projects(server_factory, tmp_path):
    server = server_factory(extra_args=["--no-require-login"])
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    admin = credentials_env(server)
    guest = {k: v for k, v in admin.items() if k not in ("XNAT_USER", "XNAT_PASS")}
    guest["NETRC"] = str(tmp_path / "no-netrc")
    with mounted(server.url, mnt, cache, admin):
        everything = sorted(os.listdir(mnt))
    with mounted(server.url, mnt, cache, guest):
        public = sorted(os.listdir(mnt))
    assert public == ["PHANTOM"] and set(everything) > set(public)
    # Offline, each one still gets their own catalog.
    with mounted(server.url, mnt, cache, guest, "--offline"):
        assert sorted(os.listdir(mnt)) == public
    with mounted(server.url, mnt, cache, admin, "--offline"):
        assert sorted(os.listdir(mnt)) == everything


def test_listing_past_ttl_is_answered_from_the_catalog_then_revalidated_in_the_background(tree, tmp_path):
    opts = {"user": tree.user, "password": tree.password, "cache_dir": str(tmp_path / "cache"), "catalog": True}
    with get_transport(tree.url, opts={**opts, "ttl": 0.5}) as first:
        subjects = first.listdir("/TREE")
    time.sleep(0.6)
    tree.set_faults(latency=1.0)
    tree.clear_requests()
    with get_transport(tree.url, opts={**opts, "ttl": 0.5}) as second:
        started = time.monotonic()
        assert second.listdir("/TREE") == subjects  # from the catalog, past its ttl
        assert time.monotonic() - started < 0.5  # without waiting for the server
        deadline = time.monotonic() + 10
        while "/data/projects/TREE/subjects" not in [r["path"] for r in tree.requests()]:
            assert time.monotonic() < deadline, "the listing was not revalidated"
            time.sleep(0.1)
