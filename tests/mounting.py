"""Real mounts for tests: ``xnatfs mount`` as a user runs it, and clean-up that never leaves one behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

XNATFS = [sys.executable, "-m", "xnatfs"]


def xnatfs(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``xnatfs`` command line; return the completed process (text output captured)."""
    return subprocess.run(
        [*XNATFS, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


def credentials_env(server, **extra: str) -> dict[str, str]:
    """Return an environment with the server's credentials in XNAT_USER / XNAT_PASS."""
    env = dict(os.environ, XNAT_USER=server.user, XNAT_PASS=server.password)
    env.update(extra)
    return env


def is_mounted(path: str) -> bool:
    """Return True if ``path`` is a mount point (octal escapes of /proc/self/mountinfo decoded)."""
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        fields = [line.split()[4] for line in f]
    return any(
        re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field) == os.fsencode(path) for field in fields
    )


def daemon_pids(mountpoint: str) -> list[int]:
    """Return the PIDs of xnatfs daemons serving ``mountpoint``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"xnatfs" in b" ".join(argv) and os.fsencode(mountpoint) in argv and b"--ready-fd" in argv:
            pids.append(int(pid))
    return pids


def force_unmount(mountpoint: str) -> None:
    """Unmount and kill the daemon, whatever state it is in (test teardown)."""
    for pid in daemon_pids(mountpoint):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, timeout=30)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=30)


@contextlib.contextmanager
def mounted(
    source: str, mountpoint: str, cache_dir: str, env: dict[str, str], *options: str, timeout: float = 10
) -> Iterator[str]:
    """Mount ``source`` at ``mountpoint`` with ``xnatfs mount`` (a background daemon); unmount after."""
    os.makedirs(mountpoint, exist_ok=True)
    log_file = os.path.join(os.path.dirname(cache_dir.rstrip("/")), f"mount-{os.path.basename(mountpoint)}.log")
    result = xnatfs(
        "mount", source, mountpoint, "--cache-dir", cache_dir, "--timeout", str(timeout),
        "--log-file", log_file, *options, env=env,
    )  # fmt: skip
    if result.returncode != 0:
        log = open(log_file).read()[-3000:] if os.path.exists(log_file) else ""
        raise AssertionError(f"mount failed: {result.stderr}\n{log}")
    try:
        yield mountpoint
    finally:
        result = xnatfs("umount", mountpoint, timeout=60)
        deadline = time.monotonic() + 10
        while daemon_pids(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        force_unmount(mountpoint)


def zip_downloads(requests: list[dict]) -> list[dict]:
    """Return the requests of a server's log that downloaded content (ZIPs or single files)."""
    found = []
    for r in requests:
        query = r.get("query") or ""
        if "format=zip" in query or (r["method"] == "GET" and "/files/" in r["path"] and "format=json" not in query):
            found.append(r)
    return found
