"""An ordinary user mounts, reads, asks for status and unmounts; nobody else reaches the mount's daemon."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from mounting import force_unmount, is_mounted, mounted

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("useradd") or not os.path.exists(f"/usr/bin/python3.{sys.version_info.minor}"),
    reason="needs root to make a user, and a system Python of the test's version",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test's interpreter may live in root's home; the user runs the system's Python of the same
# version with this checkout and the packages of the test's environment (as a user's own install would).
SYSTEM_PYTHON = f"/usr/bin/python3.{sys.version_info.minor}"
SITE = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))
USER_PATH = f"{REPO}:{SITE}"


@contextlib.contextmanager
def made_user() -> Iterator[pwd.struct_passwd]:
    """A user made for the test, with a home outside pytest's root-only folders; removed after."""
    name = f"xnatfs-t{os.getpid() % 100000}"
    home = tempfile.mkdtemp(prefix="xnatfs-home-")
    subprocess.run(["useradd", "-M", "-d", home, "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        user = pwd.getpwnam(name)
        os.chown(home, user.pw_uid, user.pw_gid)
        os.chmod(home, 0o700)
        yield user
    finally:
        for _ in range(50):  # a daemon just unmounted may take a moment to be gone
            if subprocess.run(["userdel", name], capture_output=True).returncode != 8:  # 8: user logged in
                break
            time.sleep(0.1)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def fuse_device_open_to_all() -> Iterator[None]:
    """Let ordinary users open /dev/fuse for the test's duration if it is root-only; restore its mode."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode | 0o006)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@contextlib.contextmanager
def code_reachable_by_all() -> Iterator[None]:
    """Let other users traverse the folders above this checkout and the test's packages for the
    test's duration (a CI clone may sit in a root-only temporary folder); restore their modes."""
    changed: dict[str, int] = {}
    for top in (REPO, SITE):
        folder = top
        while folder != os.path.dirname(folder):
            mode = stat.S_IMODE(os.stat(folder).st_mode)
            if folder not in changed and not mode & 0o001:
                changed[folder] = mode
                os.chmod(folder, mode | 0o001)
            folder = os.path.dirname(folder)
    try:
        yield
    finally:
        for folder, mode in changed.items():
            os.chmod(folder, mode)


def as_user(user: pwd.struct_passwd, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {"HOME": user.pw_dir, "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PYTHONPATH": USER_PATH}
    return subprocess.run(
        [
            "runuser",
            "-u",
            user.pw_name,
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in {**base, **(env or {})}.items()),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ordinary_user_mounts_with_a_private_cache_and_unmounts(server, env, tmp_path):
    xnatfs = [SYSTEM_PYTHON, "-m", "xnatfs"]
    with made_user() as user, fuse_device_open_to_all(), code_reachable_by_all():
        mnt = os.path.join(user.pw_dir, "xnat")
        credentials = {"XNAT_USER": server.user, "XNAT_PASS": server.password}
        assert as_user(user, "mkdir", mnt).returncode == 0
        try:
            result = as_user(user, *xnatfs, "mount", server.url, mnt, env=credentials)
            assert result.returncode == 0, result.stderr
            listing = as_user(user, "find", mnt, "-name", "*.dcm")
            first = sorted(listing.stdout.split())[0]
            assert as_user(user, "md5sum", first).returncode == 0
            status = json.loads(as_user(user, *xnatfs, "status", "--json", mnt).stdout)
            cache = os.path.join(user.pw_dir, ".cache", "xnatfs")
            assert status["cache_dir"] == cache and status["counters"]["downloads"] == 1
            for path, mode in ((cache, 0o700), (os.path.join(cache, "v1"), 0o700), (cache + "/xnatfs.log", 0o600)):
                st = os.stat(path)
                assert st.st_uid == user.pw_uid and stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
            # root cannot read an ordinary user's FUSE mount (no allow_other), nor can another user
            # reach its daemon: the control socket sits in a 0700 folder and is 0600 itself.
            sock = status_socket = os.path.join(cache, f"control-{user.pw_uid}")
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o700
            assert all(stat.S_IMODE(os.stat(e.path).st_mode) == 0o600 for e in os.scandir(status_socket))
            unmount = as_user(user, "fusermount3", "-u", mnt)
            assert unmount.returncode == 0, unmount.stderr
            assert not is_mounted(mnt)
        finally:
            force_unmount(mnt)


def test_another_user_cannot_reach_a_mounts_daemon(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env), made_user() as user, code_reachable_by_all():
        sockets = [e.path for e in os.scandir(os.path.join(cache_dir, "control-0"))]
        assert len(sockets) == 1
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        os.chmod(os.path.dirname(cache_dir), 0o755)  # even with the way to the cache open...
        result = as_user(user, SYSTEM_PYTHON, "-c", probe, sockets[0])
        assert result.stdout.strip() == "PermissionError", result.stdout + result.stderr
        # and root itself gets an answer (the daemon accepts its own user and root only)
        client = socket.socket(socket.AF_UNIX)
        client.connect(sockets[0])
        client.sendall(b'{"op": "status"}\n')
        assert b'"done": true' in client.recv(65536)
        client.close()
