"""The XNAT mount, for real: `xnatfs mount` against the embedded server, read by real tools."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pydicom
import pytest
import requests
import xnat
from mounting import credentials_env, daemon_pids, force_unmount, is_mounted, mounted, xnatfs, zip_downloads

from xnatfs.names import scan_folder


def expected_tree(server) -> dict[str, tuple[int, str]]:
    """Return {mount path: (size, md5)} of every scan and session file, listed with the xnat client."""
    files = {}
    with xnat.connect(server.url, user=server.user, password=server.password) as session:
        for project in session.projects.values():
            for subject in project.subjects.values():
                for experiment in subject.experiments.values():
                    base = f"{project.id}/{subject.label}/{experiment.label}"
                    groups = [
                        (f"{base}/scans/{scan_folder(s.id, s.type)}", s.resources) for s in experiment.scans.values()
                    ]
                    groups.append((base, experiment.resources))
                    for folder, resources in groups:
                        for resource in resources.values():
                            for f in resource.files.values():
                                path = f"{folder}/resources/{resource.label}/files/{f.path}"
                                files[path] = (int(f.size), f.digest)
    return files


def mounted_files(root: str) -> dict[str, int]:
    found = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_size
    return found


def md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def first_scan_dir(root: str) -> str:
    """Return the files folder of the first DICOM scan resource of the mount."""
    for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        if folder.endswith("/resources/DICOM/files") and "/scans/" in folder and any(n.endswith(".dcm") for n in names):
            return folder
    raise AssertionError("no DICOM scan in the mount")


def test_tree_sizes_and_bytes_match_the_server(server, env, mnt, cache_dir):
    expected = expected_tree(server)
    assert expected, "the demo archive has files"
    with mounted(server.url, mnt, cache_dir, env):
        server.clear_requests()
        listed = mounted_files(mnt)
        assert listed == {path: size for path, (size, _) in expected.items()}
        subprocess.run(["find", mnt, "-ls"], check=True, capture_output=True)
        subprocess.run(["du", "-s", mnt], check=True, capture_output=True)
        assert zip_downloads(server.requests()) == [], "listing must never download content"
        for path, (_size, digest) in expected.items():
            assert md5(os.path.join(mnt, path)) == digest, path
        # Each resource came as one ZIP, once.
        zips = zip_downloads(server.requests())
        assert all("format=zip" in r["query"] for r in zips)
        assert len(zips) == len({r["path"] for r in zips})


def test_listing_is_cached_and_probe_names_cost_nothing(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        server.clear_requests()
        subprocess.run(["find", mnt, "-ls"], check=True, capture_output=True)
        first = len(server.requests())
        directories = sum(1 for _ in os.walk(mnt))
        assert 0 < first <= directories
        server.clear_requests()
        subprocess.run(["find", mnt, "-ls"], check=True, capture_output=True)
        for probe in (".hidden", ".DS_Store", "desktop.ini", "autorun.inf", ".Trash-0", "no-such-project"):
            assert not os.path.exists(os.path.join(mnt, probe))
            assert not os.path.exists(os.path.join(mnt, os.listdir(mnt)[0], probe))
        assert server.requests() == []
        # Stable inode numbers and mtimes across lookups.
        project = os.path.join(mnt, sorted(os.listdir(mnt))[0])
        assert os.stat(project).st_ino == os.stat(project).st_ino
        assert len({os.stat(os.path.join(mnt, p)).st_ino for p in os.listdir(mnt)}) == len(os.listdir(mnt))


def test_eight_threads_share_one_download_and_tools_read_the_files(server, env, mnt, cache_dir, tmp_path):
    with mounted(server.url, mnt, cache_dir, env):
        scan = first_scan_dir(mnt)
        names = sorted(os.listdir(scan))[:8]
        server.clear_requests()
        results: dict[str, bytes] = {}

        def read(name: str) -> None:
            with open(os.path.join(scan, name), "rb") as f:
                results[name] = f.read()

        threads = [threading.Thread(target=read, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == names
        assert len(zip_downloads(server.requests())) == 1
        # Consumer tools on mounted paths.
        ds = pydicom.dcmread(os.path.join(scan, names[0]))
        assert ds.pixel_array.size > 0
        out = tmp_path / "nifti"
        out.mkdir()
        run = subprocess.run(["dcm2niix", "-z", "n", "-f", "vol", "-o", str(out), scan], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr + run.stdout
        volume = out / "vol.nii"
        header = volume.read_bytes()[:348]
        dims = struct.unpack("<8h", header[40:56])
        slices = len([n for n in os.listdir(scan) if n.endswith(".dcm")])
        assert dims[0] == 3 and (dims[1], dims[2], dims[3]) == (ds.Columns, ds.Rows, slices)


def test_two_mounts_sharing_a_cache_download_once_and_remount_reuses_it(server, env, tmp_path, cache_dir):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    try:
        with mounted(server.url, a, cache_dir, env), mounted(server.url, b, cache_dir, env):
            scan_a = first_scan_dir(a)
            scan_b = scan_a.replace(a, b, 1)
            names = sorted(os.listdir(scan_a))
            server.clear_requests()
            results = {}

            def read(path: str) -> None:
                with open(path, "rb") as f:
                    results[path] = hashlib.md5(f.read()).hexdigest()

            threads = [
                threading.Thread(target=read, args=(os.path.join(d, n),)) for d in (scan_a, scan_b) for n in names
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(results) == 2 * len(names)
            assert len(zip_downloads(server.requests())) == 1
        server.clear_requests()
        with mounted(server.url, a, cache_dir, env):
            scan = first_scan_dir(a)
            for name in os.listdir(scan):
                md5(os.path.join(scan, name))
            assert zip_downloads(server.requests()) == []
    finally:
        force_unmount(a)
        force_unmount(b)


def _read_in_subprocess(path: str, limit: float) -> tuple[str, float]:
    """Read ``path`` in a child process killed after ``limit`` seconds; return (outcome, seconds)."""
    code = (
        "import sys\ntry:\n    open(sys.argv[1], 'rb').read(); print('ok')\nexcept OSError as e:\n    print(e.errno)\n"
    )
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return "hang", time.monotonic() - start
    return run.stdout.strip(), time.monotonic() - start


def test_server_down_cached_reads_work_uncached_fail_with_eio(server_factory, tmp_path, cache_dir):
    srv = server_factory()
    env = credentials_env(srv)
    mnt = str(tmp_path / "mnt")
    with mounted(srv.url, mnt, cache_dir, env, "--timeout", "3"):
        scans = []
        for folder, _dirs, names in sorted(os.walk(mnt)):
            if folder.endswith("/files") and "/scans/" in folder and names:
                scans.append((folder, sorted(names)))
        (cached_dir, cached_names), (other_dir, other_names) = scans[0], scans[-1]
        assert cached_dir != other_dir
        for name in cached_names:  # the whole resource is in the cache (a first read returns before the rest)
            md5(os.path.join(cached_dir, name))
        srv.kill()
        outcome, _ = _read_in_subprocess(os.path.join(cached_dir, cached_names[-1]), limit=30)
        assert outcome == "ok"
        assert sorted(os.listdir(cached_dir)) == cached_names  # cached listing still listable
        outcome, _seconds = _read_in_subprocess(os.path.join(other_dir, other_names[0]), limit=30)
        assert outcome == str(errno.EIO)


def test_kill_9_mid_download_then_umount_and_remount_serves_correct_bytes(server, env, mnt, cache_dir):
    expected = expected_tree(server)
    with mounted(server.url, mnt, cache_dir, env):
        scan = first_scan_dir(mnt)
        name = sorted(os.listdir(scan))[-1]
        server.set_faults(throttle=20_000)  # bytes per second: the ZIP takes long to arrive
        reader = subprocess.Popen(
            [sys.executable, "-c", "import sys; open(sys.argv[1],'rb').read()", os.path.join(scan, name)]
        )
        time.sleep(1.5)
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)
        reader.wait(30)
        assert reader.returncode != 0
        assert is_mounted(mnt)
        result = xnatfs("umount", mnt)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        server.clear_faults()
    with mounted(server.url, mnt, cache_dir, env):
        rel = os.path.relpath(os.path.join(scan, name), mnt)
        assert md5(os.path.join(mnt, rel)) == expected[rel][1]


def test_writes_are_refused_with_erofs(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        scan = first_scan_dir(mnt)
        existing = os.path.join(scan, sorted(os.listdir(scan))[0])
        with open(existing, "rb") as f:  # after a read-only open, write opens must still fail
            assert f.read(1)
        for action in (
            lambda: open(os.path.join(scan, "new.txt"), "wb"),
            lambda: open(existing, "r+b"),
            lambda: open(existing, "ab"),
            lambda: os.truncate(existing, 0),
            lambda: os.mkdir(os.path.join(scan, "sub")),
            lambda: os.remove(os.path.join(scan, sorted(os.listdir(scan))[0])),
        ):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.EROFS


def test_cli_errors_are_one_line_and_leave_no_mount(server, env, tmp_path, cache_dir):
    missing = str(tmp_path / "missing")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    cases = [
        ([server.url, missing], env, "does not exist"),
        ([server.url, str(full)], env, "not empty"),
        ([server.url, empty], credentials_env(server, XNAT_PASS="wrong"), "login refused"),
        (["http://127.0.0.1:9", empty], env, "connection refused"),
        (["gopher://host", empty], env, "unknown scheme"),
        ([server.url, empty, "-o", "no_such_option"], env, "unknown option"),  # libfuse's own complaint
    ]
    for args, run_env, message in cases:
        result = xnatfs("mount", *args, "--cache-dir", cache_dir, "--timeout", "2", env=run_env)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not is_mounted(args[1])
    with mounted(server.url, empty, cache_dir, env):
        again = xnatfs("mount", server.url, empty, "--cache-dir", cache_dir, env=env)
        assert again.returncode != 0 and "already mounted" in again.stderr
        (pid,) = daemon_pids(empty)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert server.password.encode() not in f.read().split(b"\0")
    assert "not mounted" in xnatfs("umount", empty).stderr


def test_cache_survives_and_respects_size_cap(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env, "--cache-size", "1G"):
        scan = first_scan_dir(mnt)
        with open(os.path.join(scan, sorted(os.listdir(scan))[0]), "rb") as f:
            f.read()
    entries = [d for d in os.listdir(os.path.join(cache_dir, "v1"))]
    assert entries, "the cache keeps the resource after unmount"
    assert oct(os.stat(cache_dir).st_mode & 0o777) == "0o700"
    shutil.rmtree(cache_dir)


def test_hostile_names_are_made_safe_and_hostile_zips_give_eio(tmp_path):
    from hostile_server import HostileServer

    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    env = dict(os.environ, XNAT_USER="u", XNAT_PASS="p")
    before = set(os.listdir(tmp_path)) | {"mnt", "cache", "mount-mnt.log"}
    with HostileServer() as server, mounted(server.url, mnt, cache, env):
        assert sorted(os.listdir(mnt)) == ["P", "_..", "a_b"]
        assert sorted(os.listdir(f"{mnt}/P")) == [".._.._etc", "ok"]
        scans = f"{mnt}/P/ok/E/scans"
        assert sorted(os.listdir(scans)) == ["1-a____b", "2-clean"]
        files = sorted(os.listdir(f"{scans}/1-a____b/resources/DICOM/files"))
        assert "ok.dcm" in files and "bad_name" in files and all("/" not in f for f in files)
        outcome, _ = _read_in_subprocess(f"{scans}/1-a____b/resources/DICOM/files/ok.dcm", limit=30)
        assert outcome == str(errno.EIO)
        with open(f"{scans}/2-clean/resources/DICOM/files/good.dcm", "rb") as f:
            assert f.read() == b"fine!"
    assert set(os.listdir(tmp_path)) <= before
    published = [
        name for root, _dirs, files in os.walk(cache) for name in files
        if name.endswith(".json") and "catalog-v1" not in root
    ]  # fmt: skip
    assert len(published) == 1, "only the clean resource is in the cache"
    for folder, _dirs, names in os.walk(tmp_path):
        assert "escape.txt" not in names, folder
    assert not os.path.exists("/escape.txt") and not os.path.exists(os.path.join(os.path.dirname(cache), "escape.txt"))


def test_stalled_server_gives_eio_not_a_hang(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env, "--timeout", "3"):
        scan = first_scan_dir(os.path.join(mnt, "DEMO"))
        name = sorted(os.listdir(scan))[0]
        # A folder neither listed nor read ahead yet (names from the server: listing them on the mount
        # would fetch its listing ahead).
        rows = requests.get(
            f"{server.url}/data/projects/PHANTOM/experiments",
            params={"format": "json", "columns": "label,subject_label"},
            auth=(server.user, server.password),
            timeout=10,
        ).json()["ResultSet"]["Result"]
        unlisted = os.path.join(mnt, "PHANTOM", rows[0]["subject_label"], rows[0]["label"])
        server.set_faults(stall=True)
        try:
            outcome, _ = _read_in_subprocess(os.path.join(scan, name), limit=60)
            assert outcome == str(errno.EIO)
            listing = subprocess.run(["ls", unlisted], capture_output=True, text=True, timeout=60)
            assert listing.returncode != 0 and "Input/output error" in listing.stderr
        finally:
            server.clear_faults()


def test_foreground_mount_stops_cleanly_on_sigterm_and_passes_fuse_options(server, env, mnt, cache_dir):
    daemon = subprocess.Popen(
        [sys.executable, "-m", "xnatfs", "mount", server.url, mnt, "-f", "--cache-dir", cache_dir,
         "-o", "allow_other,default_permissions"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(200):
            if is_mounted(mnt) and os.listdir(mnt):
                break
            time.sleep(0.05)
        assert sorted(os.listdir(mnt)) == ["DEMO", "PHANTOM"]
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if line.split()[4] == mnt)
        assert "allow_other" in line and "default_permissions" in line and " ro" in line
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert not is_mounted(mnt)
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_data_changed_on_the_server_is_read_anew(server_factory, mnt, cache_dir):
    own = server_factory()  # its own archive: this test overwrites a file on the server
    with mounted(own.url, mnt, cache_dir, credentials_env(own), "--ttl", "1"):
        scan = first_scan_dir(mnt)
        name = sorted(os.listdir(scan))[0]
        path = os.path.join(scan, name)
        with open(path, "rb") as f:
            original = f.read()
        project, subject, experiment, _, folder = os.path.relpath(scan, mnt).split(os.sep)[:5]
        url = (
            f"{own.url}/data/projects/{project}/subjects/{subject}/experiments/{experiment}"
            f"/scans/{folder.split('-')[0]}/resources/DICOM/files/{name}?overwrite=true"
        )
        # First the same size (a page cache kept on size and date alone would serve the old bytes).
        for content in (original[:-4] + b"XNFS", original + b"longer"):
            reply = requests.put(url, data=content, auth=(own.user, own.password), timeout=10)
            assert reply.status_code in (200, 201), reply.text
            own.clear_requests()
            time.sleep(1.5)  # past the listing and attribute TTL
            assert os.stat(path).st_size == len(content)
            for _ in range(2):
                with open(path, "rb") as f:
                    assert f.read() == content
            # The server logs a ZIP once it has sent all of it, which can be after the first file was read.
            deadline = time.monotonic() + 10
            while not zip_downloads(own.requests()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(zip_downloads(own.requests())) == 1  # the new version, once
