"""The ``xnatfs`` command: serve, mount, umount, demo, download.

Errors end the command with one line on stderr (``xnatfs: error: ...``) and a non-zero exit.
The mount (and with it libfuse) is imported only by the commands that mount: ``serve`` and
``download`` work on a machine without libfuse 3.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

from xnatfs import __version__, privacy
from xnatfs.cache import Cache, default_cache_dir
from xnatfs.credentials import resolve_credentials
from xnatfs.exceptions import XnatfsError
from xnatfs.transports import UnknownSchemeError, get_transport

log = logging.getLogger("xnatfs")

HTTP_SCHEMES = ("http", "https", "xnat")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (XnatfsError, UnknownSchemeError, OSError, ValueError, TimeoutError) as error:
        print(f"xnatfs: error: {_one_line(error)}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xnatfs",
        description="Mount an XNAT archive (or a local folder, or a DICOM PACS) as a read-only folder.",
    )
    parser.add_argument("--version", action="version", version=f"xnatfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from xnatfs.server import add_serve_arguments, run_serve

    serve = commands.add_parser("serve", help="run the embedded XNAT-compatible server")
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)

    mount = commands.add_parser(
        "mount",
        help="mount a source at a folder",
        description="Mount SOURCE (http(s)://host[:port][/context], xnat://host[:port], file:///path, "
        "dicom://AET@host:port) read-only at MOUNTPOINT. Credentials: --user (password from XNAT_PASS "
        "or a prompt), else XNAT_USER + XNAT_PASS, else ~/.netrc (or $NETRC) for host:port or host.",
    )
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    _add_source_options(mount)
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="FUSE_OPTIONS",
        help="FUSE mount options, e.g. allow_other,uid=1000 (repeatable)",
    )
    mount.add_argument("--log-file", help="log file (default: CACHE_DIR/xnatfs.log when in the background)")
    mount.add_argument(
        "--ttl", type=float, default=60.0, help="seconds listings and attributes are trusted (default 60)"
    )
    mount.add_argument(
        "--offline",
        action="store_true",
        help="never contact the server: serve the listings and files already in the cache",
    )
    mount.add_argument(
        "--listing-jobs",
        type=int,
        default=6,
        metavar="N",
        help="listing requests in flight at most; listings are fetched ahead in parallel (default 6)",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument(
        "--no-xattrs",
        action="store_true",
        help="no extended attributes (saves one round trip per file in ls -l)",
    )
    mount.set_defaults(run=cmd_mount)

    unmount = commands.add_parser("umount", help="unmount (also a dead mount left by a killed daemon)")
    unmount.add_argument("mountpoint")
    unmount.set_defaults(run=cmd_umount)

    demo = commands.add_parser("demo", help="start the embedded server with the demo archive and mount it")
    demo.add_argument("mountpoint", nargs="?", default="/tmp/xnatfs-demo")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(run=cmd_demo)

    download = commands.add_parser("download", help="download an experiment's resources and unzip them")
    download.add_argument("source", help="the XNAT server, http(s)://host[:port][/context]")
    download.add_argument("project", help="project ID")
    download.add_argument("experiment", help="experiment label or ID")
    download.add_argument("--resource", default="DICOM", help="resource label, or ALL (default DICOM)")
    download.add_argument("--dest", default=".", help="destination folder (default: here)")
    download.add_argument("--user", help="user name; the password comes from XNAT_PASS or a prompt")
    download.add_argument("--timeout", type=float, default=30.0, help="bound on every network wait (s)")
    download.add_argument("-v", "--verbose", action="store_true")
    download.set_defaults(run=cmd_download)
    add_operating_commands(commands)
    return parser


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="user name (or alias token); the password comes from XNAT_PASS or a prompt")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default {default_cache_dir()})")
    parser.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="cap on the cache, e.g. 50G (least recently used data is removed)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="bound on every network wait, in seconds (default 30)"
    )
    parser.add_argument("--calling-aet", default="XNATFS", help="our AE title, for dicom:// sources")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug)")


def parse_size(text: str) -> int:
    """Return bytes for ``500M``, ``10G``, ``1.5T`` or a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 10G)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


# -- mount ----------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from xnatfs.mount import check_mountpoint, start_daemon  # loads libfuse 3, or says it is missing

    cache_dir = args.cache_dir or default_cache_dir()
    _warn_allow_other(args)
    _private_cache_and_log(cache_dir, args.log_file)
    if args.ready_fd is not None or args.foreground:
        return _mount_foreground(args, cache_dir)
    mountpoint = check_mountpoint(args.mountpoint)
    env = dict(os.environ)
    if _scheme(args.source) in HTTP_SCHEMES:
        user, password = resolve_credentials(args.source, args.user)
        if user is not None:
            env["XNAT_USER"], env["XNAT_PASS"] = user, password or ""
    argv = [
        "mount",
        args.source,
        mountpoint,
        "--cache-dir",
        cache_dir,
        "--timeout",
        str(args.timeout),
        "--ttl",
        str(args.ttl),
        "--calling-aet",
        args.calling_aet,
        "--listing-jobs",
        str(args.listing_jobs),
    ]
    if args.offline:
        argv.append("--offline")
    if args.cache_size is not None:
        argv += ["--cache-size", str(args.cache_size)]
    if args.no_xattrs:
        argv.append("--no-xattrs")
    for option in args.fuse_options:
        argv += ["-o", option]
    if args.verbose:
        argv.append("-v")
    log_file = os.path.abspath(args.log_file or os.path.join(cache_dir, "xnatfs.log"))
    argv += ["--log-file", log_file]
    # Startup includes one listing of the root: allow for its retries on top of the mount itself.
    start_daemon(argv, env, log_file, timeout=args.timeout + 30)
    if sys.stderr.isatty():
        print(
            f"xnatfs: {args.source} mounted at {mountpoint} (log: {log_file}; xnatfs umount {mountpoint} to unmount)",
            file=sys.stderr,
        )
    return 0


def _mount_foreground(args: argparse.Namespace, cache_dir: str) -> int:
    from xnatfs.mount import check_mountpoint, run

    privacy.process_umask(privacy.is_group_shared(cache_dir))  # all the daemon writes is private
    _setup_logging(args.verbose, args.log_file)
    try:
        mountpoint = check_mountpoint(args.mountpoint)
        transport = open_transport(args.source, args, cache_dir)
        try:
            # Fails now, with a clear message, on bad credentials or a dead server (unless the catalog
            # in the cache can serve: then the mount starts offline with a warning).
            warning = transport.connect()
        except BaseException:
            transport.close()
            raise
    except Exception as error:
        if args.ready_fd is not None:
            os.write(args.ready_fd, (_one_line(error) + "\n").encode())
        raise
    if warning:
        log.warning("%s", warning)
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"warning: {warning}\n".encode())
        else:
            print(f"xnatfs: warning: {warning}", file=sys.stderr)
    transport.opts["xattrs"] = not args.no_xattrs
    control = _start_control(transport, mountpoint, cache_dir, args.timeout)
    try:
        fuse_options = parse_fuse_options(args.fuse_options)
        run(transport, mountpoint, ttl=args.ttl, fuse_options=fuse_options, ready_fd=args.ready_fd)
    finally:
        if control is not None:
            control.stop()
    return 0


def open_transport(source: str, args: argparse.Namespace, cache_dir: str) -> Any:
    """Return the transport for ``source`` with the command's options (credentials resolved)."""
    opts: dict[str, Any] = {
        "timeout": args.timeout,
        "ttl": getattr(args, "ttl", 60.0),
        "cache": Cache(cache_dir, getattr(args, "cache_size", None)),
        "calling_aet": getattr(args, "calling_aet", "XNATFS"),
        "catalog": True,  # listings kept in the cache folder: remounts and offline mounts need no server
        "offline": getattr(args, "offline", False),
        "listing_jobs": getattr(args, "listing_jobs", None),
    }
    if _scheme(source) in HTTP_SCHEMES:
        opts["user"], opts["password"] = resolve_credentials(source, args.user)
    return get_transport(source, opts=opts)


def parse_fuse_options(values: list[str]) -> dict[str, str | bool]:
    """Return ``-o a,b=c`` options as ``{"a": True, "b": "c"}``."""
    options: dict[str, str | bool] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, setting = item.partition("=")
            options[key] = setting if sep else True
    options.pop("rw", None)  # the mount is read-only
    return options


def cmd_umount(args: argparse.Namespace) -> int:
    from xnatfs.mount import umount

    umount(args.mountpoint)
    return 0


# -- demo -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from xnatfs.mount import MountError, is_mounted, start_daemon, umount

    _setup_logging(args.verbose, None)
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
        _private_cache_and_log(cache_dir, log_file)
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


# -- download -------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    from xnatfs.download import download_experiment

    _setup_logging(args.verbose, None)
    user, password = resolve_credentials(args.source, args.user)
    folder = download_experiment(
        args.source,
        args.project,
        args.experiment,
        resource=args.resource,
        dest=args.dest,
        user=user,
        password=password,
        timeout=args.timeout,
        progress=sys.stderr.isatty(),
    )
    print(folder)
    return 0


# -- helpers --------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _setup_logging(verbose: bool, log_file: str | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Connection pool chatter is noise at INFO; requests never logs credentials either way.
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    return text.splitlines()[0]


# -- operating a mount: prefetch, status, cache, control channel ------------------------------


def add_operating_commands(commands: Any) -> None:
    """Add ``prefetch``, ``status`` and ``cache`` to the command line."""
    prefetch = commands.add_parser(
        "prefetch",
        help="download everything below paths of a mount into its cache",
        description="Download everything below each PATH (inside a live xnatfs mount) into the mount's cache, "
        "done by the mount's daemon. Exit 0 only when all of it is cached.",
    )
    prefetch.add_argument("paths", nargs="+", metavar="PATH")
    prefetch.add_argument("-j", "--jobs", type=int, default=4, metavar="N", help="downloads in parallel (default 4)")
    prefetch.set_defaults(run=cmd_prefetch)

    status = commands.add_parser("status", help="what a mount is doing (without MOUNTPOINT: the live mounts)")
    status.add_argument("mountpoint", nargs="?")
    status.add_argument("--json", action="store_true", help="one JSON object (a list without MOUNTPOINT)")
    status.set_defaults(run=cmd_status)

    cache = commands.add_parser("cache", help="inspect and clean a cache directory")
    cache.add_argument("--cache-dir", default=None, help=f"cache folder (default {default_cache_dir()})")
    actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("du", help="size per server and project")
    clean = actions.add_parser("clean", help="remove cached content (open files stay readable)")
    clean.add_argument("--older-than", metavar="D", help="only what was not used for D (e.g. 30d, 12h, 90m)")
    clean.add_argument("--to", type=parse_size, metavar="SIZE", help="remove least recently used until SIZE is left")
    verify = actions.add_parser("verify", help="re-check cached content against the server's digests")
    verify.add_argument("--timeout", type=float, default=30.0, help="bound on every network wait (s)")
    cache.set_defaults(run=cmd_cache)


def cmd_prefetch(args: argparse.Namespace) -> int:
    from xnatfs.prefetch import run as prefetch

    return prefetch(args.paths, jobs=args.jobs)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from xnatfs.status import list_mounts, print_status, query

    if not args.mountpoint:
        return list_mounts(args.json, sys.stdout)
    status = query(args.mountpoint)
    status.pop("done", None)
    if args.json:
        print(json.dumps(status))
    else:
        print_status(status, sys.stdout)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from xnatfs import cachetool

    return cachetool.run(args, sys.stdout)


def _start_control(transport: Any, mountpoint: str, cache_dir: str, timeout: float) -> Any:
    """Serve the mount's control socket (status, prefetch); return the server, None if it failed."""
    import time

    from xnatfs.control import ControlServer, socket_path
    from xnatfs.prefetch import Prefetcher
    from xnatfs.status import collect

    started = time.time()
    handlers = dict(Prefetcher(transport, timeout).handlers())
    handlers["status"] = lambda request, send: collect(transport, mountpoint, cache_dir, started)
    server = ControlServer(socket_path(cache_dir, mountpoint), handlers)
    try:
        transport.opts["control_socket"] = server.start()
    except (OSError, XnatfsError) as error:
        log.warning("no control socket (xnatfs status and prefetch will not reach this mount): %s", error)
        return None
    return server


def _warn_allow_other(args: argparse.Namespace) -> None:
    if "allow_other" in parse_fuse_options(args.fuse_options):
        print(
            "xnatfs: warning: allow_other: every local user can read this mount, with your XNAT rights "
            "(needs user_allow_other in /etc/fuse.conf unless you are root)",
            file=sys.stderr,
        )


def _private_cache_and_log(cache_dir: str, log_file: str | None) -> None:
    """Create the cache directory and the log before anything else does, private (see xnatfs.privacy)."""
    shared = privacy.is_group_shared(cache_dir)
    privacy.secure_dir(cache_dir, shared)
    log_path = os.path.abspath(log_file or os.path.join(cache_dir, "xnatfs.log"))
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    privacy.private_file(log_path, shared)
