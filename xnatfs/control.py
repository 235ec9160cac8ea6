"""The control channel of a mount: how ``xnatfs status`` and ``xnatfs prefetch`` reach its daemon.

The daemon listens on a Unix socket, ``CACHE_DIR/control-{uid}/{hash of the mount point}.sock``
(folder 0700, socket 0600), and answers only peers of its own user (or root), checked by
``SO_PEERCRED``. The mount's root names the socket in its ``user.xnatfs.control`` attribute, so a
client finds it from any path inside the mount.

Protocol: the client sends one JSON object per line, ``{"op": NAME, ...}``; the daemon answers
with JSON lines, the last of which has ``"done": true`` (and the result) or ``"error": "..."``.
Lines before it are progress (``{"bytes": N}``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from xnatfs.exceptions import XnatfsError

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Send], dict[str, Any]]
MAX_LINE = 1 << 20
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, without the final NUL
CONTROL_XATTR = "user.xnatfs.control"
FSTYPE = "fuse.xnatfs"


class ControlError(XnatfsError):
    """The daemon could not be reached, or answered with an error."""


def socket_path(cache_dir: str, mountpoint: str) -> str:
    """Return where the daemon of ``mountpoint`` listens: in the cache directory if the path fits
    in a socket address, else in ``$XDG_RUNTIME_DIR/xnatfs`` or ``/tmp/xnatfs-{uid}``."""
    name = hashlib.sha256(os.path.abspath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()[:16] + ".sock"
    folder = os.path.join(os.path.abspath(cache_dir), f"control-{os.getuid()}")
    if len(os.fsencode(os.path.join(folder, name))) > SUN_PATH_MAX:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        folder = os.path.join(runtime, "xnatfs") if runtime else f"/tmp/xnatfs-{os.getuid()}"
    return os.path.join(folder, name)


def _private_folder(folder: str) -> None:
    """Create ``folder`` 0700, or check that an existing one is ours, a real folder, and private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ControlError(f"{folder}: not a folder of this user; refusing to put the control socket there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class ControlServer:
    """Serves ``handlers`` (op name -> function) on the control socket of one mount."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Listen (replacing a socket left by a dead daemon) and serve in a thread; return the path."""
        _private_folder(os.path.dirname(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        handlers = self.handlers

        class _Handle(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                _serve_connection(self.connection, self.rfile, handlers)

        old = os.umask(0o177)  # the socket is created 0600: nobody else may even try to connect
        try:
            self._server = _Server(self.path, _Handle)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s", self.path)
        return self.path

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _peer_uid(connection: socket.socket) -> int:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _serve_connection(connection: socket.socket, rfile: Any, handlers: dict[str, Handler]) -> None:
    """Answer the requests of one client until it hangs up."""
    if _peer_uid(connection) not in (os.getuid(), 0):
        return  # another user: not a word

    def send(message: dict[str, Any]) -> None:
        connection.sendall(json.dumps(message).encode() + b"\n")

    while True:
        line = rfile.readline(MAX_LINE)
        if not line:
            return
        try:
            request = json.loads(line)
            handler = handlers.get(request.get("op"))
            if handler is None:
                raise ControlError(f"unknown operation {request.get('op')!r}")
            reply = dict(handler(request, send), done=True)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as error:  # every failure goes back to the client as one line
            reply = {"error": _one_line(error)}
        try:
            send(reply)
        except OSError:
            return


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    return text.splitlines()[0]


# -- client -------------------------------------------------------------------------------------


class Connection:
    """A client connection to a daemon's control socket (one request at a time)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as error:
            self.sock.close()
            raise ControlError(f"cannot reach the mount's daemon at {path}: {error.strerror or error}") from None
        self._rfile = self.sock.makefile("rb")

    def request(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request; yield its progress messages, then its final reply (``done``).

        Raises ControlError with the daemon's message if it failed, or if the daemon hung up.
        """
        self.sock.sendall(json.dumps(dict(args, op=op)).encode() + b"\n")
        while True:
            line = self._rfile.readline(MAX_LINE)
            if not line:
                raise ControlError("the mount's daemon closed the connection")
            message = json.loads(line)
            if "error" in message:
                raise ControlError(message["error"])
            yield message
            if message.get("done"):
                return

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its final reply. Raises ControlError."""
        return list(self.request(op, **args))[-1]

    def close(self) -> None:
        """Close the connection (also from another thread, to interrupt a request)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._rfile.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def xnatfs_mounts() -> list[tuple[str, str]]:
    """Return ``(mount point, fsname)`` of the xnatfs mounts of this machine (dead ones too)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) > 4 and tail and tail[0] == FSTYPE:
                found.append((_unescape(fields[4]), _unescape(tail[1]) if len(tail) > 1 else ""))
    return found


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def find_mount(path: str) -> tuple[str, str]:
    """Return ``(mount point, tree path)`` of ``path``, a path inside a live xnatfs mount.

    Raises ControlError if it is in none.
    """
    real = os.path.abspath(path)
    best = ""
    for mountpoint, _ in xnatfs_mounts():
        if (real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) > len(best):
            best = mountpoint
    if not best:
        raise ControlError(f"{path}: not inside an xnatfs mount")
    rest = real[len(best) :].strip("/")
    return best, "/" + rest


def control_socket(mountpoint: str) -> str:
    """Return the control socket of the xnatfs mount at ``mountpoint``: named by its root's
    attribute, else (a mount without xattrs) found from its daemon's arguments. Raises ControlError."""
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as error:
        found = _socket_from_daemon(mountpoint)
        if found is None:
            raise ControlError(f"{mountpoint}: no control channel ({error.strerror or error})") from None
        return found


def _socket_from_daemon(mountpoint: str) -> str | None:
    """Return the socket of this user's daemon serving ``mountpoint`` (from its command line), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
        except OSError:
            continue
        if "--ready-fd" in argv and "--cache-dir" in argv and mountpoint in argv and "mount" in argv:
            index = argv.index("--cache-dir") + 1
            if index < len(argv):
                path = socket_path(argv[index], mountpoint)
                if os.path.exists(path):
                    return path
    return None


def connect(mountpoint: str, timeout: float = 10.0) -> Connection:
    """Return a connection to the daemon of the xnatfs mount at ``mountpoint``. Raises ControlError."""
    return Connection(control_socket(mountpoint), timeout)
