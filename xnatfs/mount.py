"""Mounting and unmounting: checks, the daemon, and cleaning up dead mounts.

``xnatfs mount`` without ``-f`` starts the daemon (this module, in foreground mode) as a child
process and returns once the child says the mount is live, or prints the child's one-line error.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from xnatfs.exceptions import XnatfsError
from xnatfs.fuse import mfusepy
from xnatfs.fuse_ops import Operations
from xnatfs.options import TTL
from xnatfs.readdirplus import readdir_plus_methods
from xnatfs.transports.base import AbstractTransport

log = logging.getLogger(__name__)


@functools.cache  # one class per base: its threads are pinned once
def fuse_class(base: type) -> type:
    """Return ``base`` (mfusepy's FUSE) with libfuse's worker threads kept known to Python.

    Each callback from a thread Python did not create gets a fresh Python thread state, destroyed
    again on return (ctypes' PyGILState_Ensure/Release): that costs more than the whole
    operation. Taking one extra, never released PyGILState reference per worker thread keeps its
    thread state alive, which halves the cost of every FUSE call (measured: open+close 224 -> 123 us).
    This hooks mfusepy's private ``_wrapper(self, func, *args, **kwargs)``: when ``base`` has no such
    method (a changed mfusepy), returns ``base`` itself, which works the same, only slower.
    """
    wrapper = getattr(base, "_wrapper", None)
    if not callable(wrapper) or not _is_wrapper_signature(wrapper):
        log.info("mfusepy has no _wrapper(self, func, *args, **kwargs): FUSE threads are not pinned")
        return base
    pinned: set[int] = set()

    def _wrapper(self, func, *args, **kwargs):  # type: ignore[no-untyped-def]
        thread = threading.get_ident()
        if thread not in pinned:
            pinned.add(thread)
            ctypes.pythonapi.PyGILState_Ensure()
        return wrapper(self, func, *args, **kwargs)

    methods: dict[str, Any] = {"_wrapper": _wrapper, "__doc__": fuse_class.__doc__}
    # Folders are listed with attributes (see xnatfs.readdirplus), where this mfusepy allows it.
    methods.update(readdir_plus_methods(mfusepy, base) or {})
    return type(f"Pinned{base.__name__}", (base,), methods)


def _is_wrapper_signature(function: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    kinds = [parameter.kind for parameter in parameters]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return kinds == [positional, positional, inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]


class MountError(XnatfsError):
    """A mount could not be made, or unmade."""


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape_mountinfo(field: bytes) -> str:
    """Return a path field of /proc/self/mountinfo as a path.

    The kernel escapes space, tab, newline and backslash as ``\\ooo`` and leaves every other byte
    as it is (UTF-8 names stay UTF-8): only those escapes are decoded, then the bytes as a file name.
    """
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), field))


def mounted_paths() -> set[str]:
    """Return the mount points of this machine, dead FUSE mounts included."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            points.add(unescape_mountinfo(line.split()[4]))  # field 5 is the mount point
    return points


def is_mounted(path: str) -> bool:
    """Return True if ``path`` is a mount point (also when its daemon has died)."""
    return os.path.abspath(path) in mounted_paths()


def check_mountpoint(path: str) -> str:
    """Return ``path`` made absolute if a mount can go there; raise MountError saying why not."""
    path = os.path.abspath(path)
    if is_mounted(path):
        raise MountError(f"{path}: already mounted (xnatfs umount {path} to unmount it)")
    if not os.path.exists(path):
        raise MountError(f"{path}: mount point does not exist")
    if not os.path.isdir(path):
        raise MountError(f"{path}: mount point is not a folder")
    if os.listdir(path):
        raise MountError(f"{path}: mount point is not empty")
    return path


def run(
    transport: AbstractTransport,
    mountpoint: str,
    ttl: float = TTL,
    fuse_options: dict[str, str | bool] | None = None,
    ready_fd: int | None = None,
) -> None:
    """Mount ``transport`` at ``mountpoint`` and serve until unmounted (or SIGINT/SIGTERM).

    Writes ``ok`` to ``ready_fd`` once the mount is live. Raises MountError if mounting fails.
    """
    operations = Operations(transport, ttl=ttl)
    if ready_fd is not None:

        def ready() -> None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

        operations.on_ready = ready
    options: dict[str, str | bool] = {"fsname": f"xnatfs:{transport.name}", "subtype": "xnatfs"}
    options.update(fuse_options or {})
    options["ro"] = True
    log.info("mounting %s at %s", transport.opts.get("url", transport.name), mountpoint)
    try:
        fuse_class(mfusepy.FUSE)(operations, mountpoint, foreground=True, raw_fi=True, **options)
    except RuntimeError as error:
        # libfuse reports a stop by SIGINT/SIGTERM as an error too; a file system it tore down
        # itself (destroy called) was stopped cleanly.
        if not operations.destroyed:
            raise MountError(f"{mountpoint}: mount failed ({error}); see the log for the cause") from None
    finally:
        transport.close()
    log.info("unmounted %s", mountpoint)


def start_daemon(argv: list[str], env: dict[str, str], log_file: str, timeout: float) -> None:
    """Run ``xnatfs ARGV --ready-fd N`` as a detached daemon and wait until its mount is live.

    The daemon's output goes to ``log_file``. Raises MountError with the daemon's own message
    if it exits or says nothing within ``timeout`` seconds.
    """
    read_fd, write_fd = os.pipe()
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    with open(log_file, "ab") as log_out:
        log_start = log_out.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "xnatfs", *argv, "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=log_out,
            env=env,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    message = b""
    closed = False  # the child closed its end of the pipe: it is exiting
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.2)
            if ready:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    closed = True
                    break
                message += chunk
                # The daemon may send warning lines before its "ok" or its error line.
                while message.startswith(b"warning: ") and b"\n" in message:
                    line, message = message.split(b"\n", 1)
                    print(f"xnatfs: {line.decode(errors='replace')}", file=sys.stderr)
                if message.endswith(b"\n"):
                    break
            elif child.poll() is not None:
                break
    finally:
        os.close(read_fd)
    text = message.decode(errors="replace").strip()
    if text == "ok":
        return
    try:
        # The pipe closes as the child exits, a moment before its exit status can be collected.
        status = child.wait(timeout=5) if closed and not text else child.poll()
    except subprocess.TimeoutExpired:
        status = None
    if status is not None and not text:
        cause = _daemon_error(log_file, log_start) or f"the mount daemon exited with status {status}"
        raise MountError(f"{cause} (log: {log_file})")
    if status is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    raise MountError(text or f"the mount did not come up within {timeout:.0f} s (log: {log_file})")


def _daemon_error(log_file: str, offset: int) -> str:
    """Return the cause a daemon that exited early left in its log ("" if none): libfuse's own
    complaint or fusermount's (they write to stderr, which is the log), else the daemon's error line."""
    try:
        with open(log_file, "rb") as log_in:
            log_in.seek(offset)
            lines = log_in.read(1 << 16).decode(errors="replace").splitlines()
    except OSError:
        return ""
    fuse_lines = [line.strip() for line in lines if line.startswith(("fuse: ", "fusermount: ", "fusermount3: "))]
    if fuse_lines:
        return fuse_lines[-1]
    prefix = "xnatfs: error: "
    error_lines = [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]
    return error_lines[-1] if error_lines else ""


def umount(mountpoint: str) -> None:
    """Unmount ``mountpoint``, also when its daemon was killed. Raises MountError."""
    path = os.path.abspath(mountpoint)
    if not is_mounted(path):
        raise MountError(f"{path}: not mounted")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    attempts = [[fusermount, "-u", path], [fusermount, "-uz", path]] if fusermount else []
    attempts.append(["umount", "-l", path])
    errors = []
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and not is_mounted(path):
            return
        errors.append(result.stderr.strip())
    raise MountError(f"{path}: could not unmount: {errors[-1] if errors else 'no unmount tool'}")
