"""The platform users have: libfuse 2 beside libfuse 3, non-ASCII mount points, cheap imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mounting import daemon_pids, mounted, xnatfs
from mounting import is_mounted as mounted_here

ROOT = Path(__file__).resolve().parent.parent


def libfuse2_path() -> str:
    """Return the path of libfuse 2 (scripts/setup installs it beside libfuse 3 on purpose)."""
    listing = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"libfuse\.so\.2 .*=> (\S+)", listing)
    if not found:
        pytest.fail("libfuse 2 is not installed: scripts/setup installs it")
    return found.group(1)


def mapped_libfuse(mountpoint: str) -> set[str]:
    """Return the names of the libfuse libraries the daemon serving ``mountpoint`` has mapped."""
    (pid,) = daemon_pids(mountpoint)
    with open(f"/proc/{pid}/maps") as f:
        return {os.path.basename(line.split()[-1]) for line in f if "libfuse" in line}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "series").mkdir(parents=True)
    (data / "series" / "a.dcm").write_bytes(b"A" * 5000)
    return data


def test_daemon_runs_on_libfuse3_with_libfuse2_installed(folder: Path, tmp_path: Path) -> None:
    libfuse2_path()  # both are installed
    mnt = str(tmp_path / "mnt")
    env = {k: v for k, v in os.environ.items() if k != "FUSE_LIBRARY_PATH"}
    with mounted(f"file://{folder}", mnt, str(tmp_path / "cache"), env):
        libraries = mapped_libfuse(mnt)
        assert any(name.startswith("libfuse3.so") for name in libraries), libraries
        assert not any(name.startswith("libfuse.so") for name in libraries), libraries
        # FUSE 3 only: our own inode numbers (use_ino), stable across mounts, not libfuse's counters.
        inode = os.stat(f"{mnt}/series/a.dcm").st_ino
        assert inode > 1 << 32
    with mounted(f"file://{folder}", mnt, str(tmp_path / "cache"), env):
        assert os.stat(f"{mnt}/series/a.dcm").st_ino == inode


def test_users_fuse_library_path_wins(folder: Path, tmp_path: Path) -> None:
    mnt = str(tmp_path / "mnt")
    env = dict(os.environ, FUSE_LIBRARY_PATH=libfuse2_path())
    with mounted(f"file://{folder}", mnt, str(tmp_path / "cache"), env):
        libraries = mapped_libfuse(mnt)
        assert any(name.startswith("libfuse.so.2") for name in libraries), libraries
        assert not any(name.startswith("libfuse3") for name in libraries), libraries
        with open(f"{mnt}/series/a.dcm", "rb") as f:
            assert f.read() == b"A" * 5000


def test_mount_says_when_libfuse3_is_missing(folder: Path, tmp_path: Path) -> None:
    """A machine with libfuse 2 only (ldconfig knows no libfuse 3): one line, nothing mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hide_libfuse3 = (
        "import ctypes.util, subprocess, sys\n"
        "ctypes.util.find_library = lambda name: None\n"
        "subprocess.run = lambda *a, **k: subprocess.CompletedProcess(a, 0, '', '')\n"
        "from xnatfs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FUSE_LIBRARY_PATH"}
    result = subprocess.run(
        [sys.executable, "-c", hide_libfuse3, "mount", f"file://{folder}", str(mnt), "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "libfuse 3 is not installed" in result.stderr, result.stderr
    assert not os.path.ismount(mnt) and not daemon_pids(str(mnt))


def test_serve_download_and_transports_need_no_libfuse(server, tmp_path: Path) -> None:
    # Importing the transports and the command line loads neither libfuse nor pynetdicom.
    code = (
        "import sys\n"
        "import xnatfs.transports\n"
        "from xnatfs.transports import FileTransport, XnatTransport\n"
        "from xnatfs import cli\n"
        "cli.build_parser()\n"
        "print(sorted(m for m in ('mfusepy', 'xnatfs.fuse', 'pynetdicom') if m in sys.modules))\n"
        "from xnatfs.transports import DicomTransport\n"
        "print(DicomTransport.__name__, 'pynetdicom' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["[]", "DicomTransport True"], out.stderr
    # serve and download work where no libfuse can be loaded at all.
    env = dict(os.environ, FUSE_LIBRARY_PATH="/nonexistent/libfuse3.so.3", XNATFS_SERVE_PASSWORD="admin")
    serve = subprocess.Popen(
        [sys.executable, "-m", "xnatfs", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert serve.stdout is not None
        assert "listening on http://127.0.0.1:" in serve.stdout.readline()
    finally:
        serve.terminate()
        serve.wait(10)
    env.update(XNAT_USER=server.user, XNAT_PASS=server.password)
    auth = (server.user, server.password)
    projects = requests.get(f"{server.url}/data/projects?format=json", auth=auth, timeout=30).json()
    project = projects["ResultSet"]["Result"][0]["ID"]
    experiments = requests.get(f"{server.url}/data/projects/{project}/experiments?format=json", auth=auth, timeout=30)
    experiment = experiments.json()["ResultSet"]["Result"][0]["label"]
    result = xnatfs("download", server.url, project, experiment, "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    # Without any libfuse, mount says so in one line.
    bad = xnatfs("mount", server.url, str(tmp_path), env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "libfuse3.so.3" in bad.stderr, bad.stderr


def test_non_ascii_mount_point_with_a_space(folder: Path, tmp_path: Path) -> None:
    from xnatfs.mount import is_mounted

    mnt = str(tmp_path / "münchen data")
    os.makedirs(mnt)
    result = xnatfs("mount", f"file://{folder}", mnt, "--cache-dir", str(tmp_path / "cache"))
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        with open(os.path.join(mnt, "series", "a.dcm"), "rb") as f:
            assert f.read() == b"A" * 5000
        again = xnatfs("mount", f"file://{folder}", mnt, "--cache-dir", str(tmp_path / "cache"))
        assert again.returncode == 1 and "already mounted" in again.stderr
        done = xnatfs("umount", mnt)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt) and not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, timeout=30)


def test_setup_installs_libfuse2_and_stops_no_process_it_did_not_start() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "libfuse2t64" in setup and "libfuse2=libfuse2" in setup
    for script in (ROOT / "scripts").rglob("*"):
        if script.is_file():
            text = script.read_text(errors="replace")
            assert not re.search(r"\b(pkill|killall)\b", text), f"{script} stops processes by name"
    # The only service stopped is the one the Orthanc package started: by its unit, or its own pid file.
    assert "systemctl disable --now orthanc.service" in setup


# An mfusepy whose private _wrapper takes other arguments: xnatfs must not override it.
CHANGED_MFUSEPY = """
import sys, mfusepy
original = mfusepy.FUSE._wrapper
mfusepy.FUSE._wrapper = lambda self, func, *args: original(self, func, *args)
from xnatfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_mount_works_when_mfusepy_changed_its_private_wrapper(folder: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = [sys.executable, "-c", CHANGED_MFUSEPY, "mount", f"file://{folder}", str(mnt), "-f"]
    daemon = subprocess.Popen([*argv, "--cache-dir", str(tmp_path / "cache")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not mounted_here(str(mnt)) and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "series" / "a.dcm").read_bytes() == b"A" * 5000
        assert sorted(os.listdir(mnt / "series")) == ["a.dcm"]
    finally:
        xnatfs("umount", str(mnt), timeout=30)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, stderr
    assert "FUSE threads are not pinned" in stderr


def test_threads_are_pinned_with_the_mfusepy_we_know() -> None:
    from xnatfs.fuse import mfusepy
    from xnatfs.mount import fuse_class

    pinned = fuse_class(mfusepy.FUSE)
    assert pinned is not mfusepy.FUSE and issubclass(pinned, mfusepy.FUSE)

    class NoWrapper:
        pass

    assert fuse_class(NoWrapper) is NoWrapper
