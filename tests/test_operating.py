"""Operating a mount through the real CLI: prefetch, status, extended attributes, xnatfs cache."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import time

import pytest
from mounting import XNATFS, mounted, xnatfs, zip_downloads


def experiment_dir(mnt: str) -> str:
    """Return the first experiment folder of the demo archive's DEMO project (a listing, no download)."""
    subject = sorted(os.listdir(os.path.join(mnt, "DEMO")))[0]
    experiment = sorted(os.listdir(os.path.join(mnt, "DEMO", subject)))[0]
    return os.path.join(mnt, "DEMO", subject, experiment)


def files_below(folder: str) -> list[str]:
    return sorted(os.path.join(root, name) for root, _dirs, names in os.walk(folder) for name in names)


def md5_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def status_json(mnt: str) -> dict:
    result = xnatfs("status", mnt, "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_prefetch_then_reading_makes_no_content_request(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        experiment = experiment_dir(mnt)
        files = files_below(experiment)
        assert files and all(os.getxattr(f, "user.xnatfs.cached") == b"0" for f in files)
        assert zip_downloads(server.requests()) == []  # listing and xattrs downloaded nothing

        result = xnatfs("prefetch", experiment, "-j", "2", env=env)
        assert result.returncode == 0, result.stderr
        summary = result.stdout.strip().splitlines()
        assert len(summary) == 1 and ", 0 failed" in summary[0], result.stdout
        units = {r["path"] for r in zip_downloads(server.requests())}
        assert len(units) == len(zip_downloads(server.requests())) > 1  # each resource once

        server.clear_requests()
        for path in files:  # every byte now comes from the cache
            assert os.getxattr(path, "user.xnatfs.cached") == b"1"
            digest = os.getxattr(path, "user.xnat.digest").decode()
            assert md5_of(path) == digest
        assert zip_downloads(server.requests()) == []

        again = xnatfs("prefetch", experiment, env=env)  # nothing left to do
        assert again.returncode == 0 and f"({len(units)} were already)" in again.stdout, again.stdout
        assert zip_downloads(server.requests()) == []


def test_prefetch_reports_failures_and_outside_paths(server, env, mnt, cache_dir, tmp_path):
    with mounted(server.url, mnt, cache_dir, env, "--timeout", "3"):
        experiment = experiment_dir(mnt)
        files_below(experiment)  # listings cached while the server is well
        (dicom,) = [
            os.path.join(experiment, "scans", d, "resources", "DICOM")
            for d in os.listdir(experiment + "/scans")
            if d.startswith("1-")
        ]
        resource_id = os.getxattr(dicom, "user.xnat.id").decode()  # XNAT's URLs name resources by ID
        server.set_faults(error={"status": 403, "path": rf"/scans/1/resources/{resource_id}/files$"})
        result = xnatfs("prefetch", experiment, str(tmp_path), env=env)
        assert result.returncode == 1
        errors = result.stderr.strip().splitlines()
        assert any("scans/1-" in line and "DICOM" in line for line in errors), result.stderr
        assert any(f"{tmp_path}: not inside an xnatfs mount" in line for line in errors), result.stderr
        assert all(line.startswith("xnatfs: error: ") for line in errors)
        assert "2 failed" in result.stdout
        # what did download is cached: a second run fetches only the failed resource
        server.clear_faults()
        server.clear_requests()
        result = xnatfs("prefetch", experiment, env=env)
        assert result.returncode == 0, result.stderr
        assert [r["path"].rsplit("/resources/", 1)[0][-8:] for r in zip_downloads(server.requests())] == ["/scans/1"]


def test_status_shows_the_download_in_flight_and_the_counters_after(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        scans = os.path.join(experiment_dir(mnt), "scans")
        resource = os.path.join(scans, sorted(os.listdir(scans))[0], "resources", "DICOM")
        idle = status_json(mnt)
        assert idle["source"] == server.url and idle["online"] is True
        assert idle["cache_dir"] == os.path.abspath(cache_dir) and idle["cache_bytes"] == 0
        assert idle["downloads"] == [] and idle["counters"]["downloads"] == 0

        server.set_faults(throttle=40_000)  # a resource of ~100 kB takes a few seconds
        prefetch = subprocess.Popen(
            [*XNATFS, "prefetch", resource], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 15
            busy = None
            while time.monotonic() < deadline:
                busy = status_json(mnt)
                if busy["downloads"] and busy["downloads"][0]["bytes"] > 0:
                    break
                time.sleep(0.2)
            assert busy and busy["downloads"], busy
            flight = busy["downloads"][0]
            assert flight["path"] == "/" + os.path.relpath(resource, mnt)
            assert 0 < flight["bytes"] < flight["total"]
            text = xnatfs("status", mnt).stdout
            assert "1 in flight" in text and flight["path"] in text
            listing = xnatfs("status").stdout
            assert any(line.startswith(f"{mnt}  {server.url}  online  1 downloads") for line in listing.splitlines())
        finally:
            server.clear_faults()
            out, err = prefetch.communicate(timeout=60)
        assert prefetch.returncode == 0, err
        after = status_json(mnt)
        assert after["downloads"] == []
        assert after["counters"]["downloads"] == 1 and after["counters"]["errors"] == 0
        assert after["counters"]["bytes"] == after["cache_bytes"] == flight["total"]


def test_prefetch_stops_cleanly_on_ctrl_c(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        experiment = experiment_dir(mnt)
        files_below(experiment)
        server.set_faults(throttle=20_000)
        prefetch = subprocess.Popen([*XNATFS, "prefetch", experiment, "-j", "1"], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not status_json(mnt)["downloads"]:
            time.sleep(0.1)
        prefetch.send_signal(signal.SIGINT)
        out, _ = prefetch.communicate(timeout=10)
        assert prefetch.returncode == 130
        assert "interrupted" in out
        server.clear_faults()
        assert os.listdir(experiment)  # the mount is unharmed


def test_xattrs_of_folders_and_files_before_and_after_a_read(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        experiment = experiment_dir(mnt)
        scans = os.path.join(experiment, "scans")
        scan = os.path.join(scans, sorted(os.listdir(scans))[0])
        dump = subprocess.run(["getfattr", "-d", scan], capture_output=True, text=True, check=True).stdout
        scan_id = os.path.basename(scan).split("-", 1)[0]
        assert f'user.xnat.id="{scan_id}"' in dump and "user.xnat.type=" in dump, dump
        assert "user.xnat.series_description=" in dump
        assert os.getxattr(scan, "user.xnat.uri").decode().endswith(f"/scans/{scan_id}")
        assert os.getxattr(experiment, "user.xnat.uri").decode().startswith("/data/experiments/XNAT_E")
        assert os.getxattr(os.path.join(mnt, "DEMO"), "user.xnat.id") == b"DEMO"

        path = files_below(scan)[0]
        names = os.listxattr(path)
        assert {"user.xnat.uri", "user.xnat.digest", "user.xnatfs.cached"} <= set(names)
        assert os.getxattr(path, "user.xnatfs.cached") == b"0"
        assert zip_downloads(server.requests()) == []  # attributes never download
        with pytest.raises(OSError) as info:
            os.getxattr(path, "user.no.such")
        assert info.value.errno == errno.ENODATA
        with pytest.raises(OSError) as info:
            os.setxattr(path, "user.mine", b"1")
        assert info.value.errno == errno.EROFS

        with open(path, "rb") as f:
            data = f.read()
        assert os.getxattr(path, "user.xnatfs.cached") == b"1"
        assert hashlib.md5(data).hexdigest() == os.getxattr(path, "user.xnat.digest").decode()
        dump = subprocess.run(["getfattr", "-d", path], capture_output=True, text=True, check=True).stdout
        assert 'user.xnatfs.cached="1"' in dump


def test_cache_du_clean_during_a_live_read_and_verify(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        experiment = experiment_dir(mnt)
        assert xnatfs("prefetch", experiment, env=env).returncode == 0
        du = xnatfs("cache", "--cache-dir", cache_dir, "du")
        assert du.returncode == 0 and f"{server.url}  DEMO" in du.stdout, du.stdout

        assert "removed 0 entries" in xnatfs("cache", "--cache-dir", cache_dir, "clean", "--older-than", "1h").stdout
        path = max(files_below(experiment), key=os.path.getsize)
        expected = os.getxattr(path, "user.xnat.digest").decode()
        with open(path, "rb") as f:
            head = f.read(1000)
            cleaned = xnatfs("cache", "--cache-dir", cache_dir, "clean")  # everything, while the file is open
            assert cleaned.returncode == 0 and "0 left (0 B)" in cleaned.stdout, cleaned.stdout
            rest = f.read()
        assert hashlib.md5(head + rest).hexdigest() == expected
        assert os.getxattr(path, "user.xnatfs.cached") == b"0"
        assert md5_of(path) == expected  # downloaded again

        # verify: a damaged file in the cache is found against the server's digest and dropped
        assert xnatfs("prefetch", experiment, env=env).returncode == 0
        good = xnatfs("cache", "--cache-dir", cache_dir, "verify", env=env)
        assert good.returncode == 0 and " 0 bad" in good.stdout, good.stdout + good.stderr
        victim = next(p for p in files_below(os.path.join(cache_dir, "v1")) if p.endswith(".dcm"))
        with open(victim, "r+b") as f:
            f.seek(200)
            f.write(b"\xff" * 8)
        bad = xnatfs("cache", "--cache-dir", cache_dir, "verify", env=env)
        assert bad.returncode == 1 and " 1 bad" in bad.stdout and "does not match its digest (removed)" in bad.stdout
        assert not os.path.exists(victim)
        assert xnatfs("cache", "--cache-dir", cache_dir, "verify", env=env).returncode == 0


def test_cache_and_log_are_private_unless_the_folder_is_group_shared(server, env, tmp_path):
    for shared in (False, True):
        cache = tmp_path / f"cache-{shared}"
        mnt = str(tmp_path / f"mnt-{shared}")
        os.makedirs(mnt)
        if shared:
            cache.mkdir()
            os.chown(cache, -1, 100)  # the group "users": an explicit choice to share
            os.chmod(cache, 0o2770)
        result = xnatfs("mount", server.url, mnt, "--cache-dir", str(cache), "-o", "allow_other", env=env)
        assert result.returncode == 0, result.stderr
        try:
            assert "warning: allow_other: every local user can read this mount" in result.stderr
            files_below(experiment_dir(mnt))
            with open(files_below(experiment_dir(mnt))[0], "rb") as f:
                f.read()
        finally:
            xnatfs("umount", mnt)
        folders = [str(cache), str(cache / "v1")] + [r for r, _d, _n in os.walk(cache / "v1")]
        files = [str(cache / "xnatfs.log")] + files_below(str(cache / "v1"))
        assert len(folders) > 3 and len(files) > 3
        for folder in folders:
            mode = stat.S_IMODE(os.stat(folder).st_mode)
            assert mode & 0o007 == 0 and (mode & 0o050 == 0o050 if shared else mode & 0o070 == 0), (folder, oct(mode))
        for name in files:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            assert mode & 0o007 == 0 and (mode & 0o040 == 0o040 if shared else mode & 0o070 == 0), (name, oct(mode))
        assert os.stat(cache / "xnatfs.log").st_size > 0


def test_a_mount_without_xattrs_still_answers_status_and_prefetch(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env, "--no-xattrs"):
        experiment = experiment_dir(mnt)
        with pytest.raises(OSError) as info:
            os.getxattr(experiment, "user.xnat.uri")
        assert info.value.errno == errno.EOPNOTSUPP
        assert status_json(mnt)["source"] == server.url  # the socket is found from the daemon's arguments
        result = xnatfs("prefetch", experiment, env=env)
        assert result.returncode == 0, result.stderr
