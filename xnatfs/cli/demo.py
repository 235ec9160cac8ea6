"""``xnatfs demo``: the embedded server with its demo archive, mounted, until Ctrl-C."""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

from xnatfs.cli.common import private_cache_and_log, setup_logging
from xnatfs.exceptions import XnatfsError
from xnatfs.options import default_cache_dir


def add_parser(commands: Any) -> None:
    """Add ``demo``."""
    demo = commands.add_parser("demo", help="start the embedded server with the demo archive and mount it")
    demo.add_argument("mountpoint", nargs="?", default="/tmp/xnatfs-demo")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from xnatfs.mount import MountError, is_mounted, start_daemon, umount

    setup_logging(args.verbose, None)
    mountpoint = os.path.abspath(args.mountpoint)
    os.makedirs(mountpoint, exist_ok=True)
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint}: already mounted (xnatfs umount {mountpoint})")
    env = dict(os.environ, XNATFS_SERVE_PASSWORD="admin", XNAT_USER="admin", XNAT_PASS="admin")
    server = subprocess.Popen(
        [sys.executable, "-m", "xnatfs", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        url = _server_url(server)
        cache_dir = os.path.join(default_cache_dir(), "demo")
        log_file = os.path.join(cache_dir, "xnatfs.log")
        private_cache_and_log(cache_dir, log_file)
        start_daemon(
            ["mount", url, mountpoint, "--cache-dir", cache_dir, "--log-file", log_file], env, log_file, timeout=60
        )
        projects = sorted(os.listdir(mountpoint))
        print(f"xnatfs demo: the embedded XNAT server runs at {url} (user admin, password admin)")
        print(f"xnatfs demo: mounted at {mountpoint}: {len(projects)} projects ({', '.join(projects)})")
        print("Try:")
        print(f"  ls -l {mountpoint}/*/*/*/scans")
        print(f"  find {mountpoint} -name '*.dcm' | head")
        print(f"  dcm2niix -o /tmp {_first_dicom_folder(mountpoint)}")
        print(f"Log: {log_file}. Stop with Ctrl-C (or: kill {os.getpid()}).", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            if server.poll() is not None:
                print("xnatfs demo: the server stopped", file=sys.stderr)
                break
        print("xnatfs demo: unmounting and stopping", flush=True)
        return 0
    finally:
        if is_mounted(mountpoint):
            try:
                umount(mountpoint)
            except MountError as error:
                print(f"xnatfs: {error}", file=sys.stderr)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def _first_dicom_folder(root: str) -> str:
    """Return the files folder of the first scan with a DICOM resource (listings only, no download)."""
    pattern = os.path.join(root, "*", "*", "*", "scans", "*", "resources", "DICOM", "files")
    found = sorted(glob.glob(pattern))
    return found[0] if found else pattern


def _server_url(server: subprocess.Popen) -> str:
    """Return the URL that ``xnatfs serve`` prints once it listens."""
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        raise XnatfsError(f"the embedded server did not start: {line.strip() or 'no output'}")
    return match.group(1)
