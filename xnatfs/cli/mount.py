"""``xnatfs mount`` and ``xnatfs umount``.

The mount command knows no transport: the transport that serves the source's scheme declares its
own options (``options``) and whether it needs credentials (``needs_credentials``), see
:mod:`xnatfs.options`. Without ``-f`` the command checks what it can, resolves the credentials
(asking for a password on the terminal if need be) and starts the daemon with the user's own
arguments plus ``--ready-fd``; the daemon runs the same command in the foreground.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from xnatfs import options, privacy
from xnatfs.cli.common import default_log_file, one_line, parse_size, private_cache_and_log, setup_logging
from xnatfs.credentials import resolve_credentials
from xnatfs.exceptions import XnatfsError
from xnatfs.options import Option, default_cache_dir
from xnatfs.transports import UnknownSchemeError, get_transport, transport_class, transport_classes

log = logging.getLogger("xnatfs")

# The options of every source, and of the mount command, that take a value.
SOURCE_OPTIONS = (
    Option(
        "--cache-size",
        "cap on the cache, e.g. 50G (least recently used data is removed)",
        type=parse_size,
        metavar="SIZE",
    ),
    Option(
        "--timeout", f"bound on every network wait, in seconds (default {options.TIMEOUT:g})", options.TIMEOUT, float
    ),
)
MOUNT_OPTIONS = (
    Option("--ttl", f"seconds listings and attributes are trusted (default {options.TTL:g})", options.TTL, float),
    Option("--listing-jobs", "listing requests in flight at most; listings are fetched ahead in parallel "
           f"(default {options.LISTING_JOBS})", options.LISTING_JOBS, int, "N"),
)  # fmt: skip


def add_parsers(commands: Any, argv: list[str]) -> None:
    """Add ``mount`` and ``umount``; ``mount`` takes the options of the transport of the source in ``argv``.

    With ``--help`` it lists those of every transport; without a source (or with an unknown scheme), none.
    """
    mount = commands.add_parser(
        "mount",
        help="mount a source at a folder",
        description="Mount SOURCE (http(s)://host[:port][/context], xnat://host[:port], file:///path, "
        "dicom://AET@host:port) read-only at MOUNTPOINT. Credentials: --user (password from XNAT_PASS "
        "or a prompt), else XNAT_USER + XNAT_PASS, else ~/.netrc (or $NETRC) for host:port or host.",
    )
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    add_source_options(mount)
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
        "--offline",
        action="store_true",
        help="never contact the server: serve the listings and files already in the cache",
    )
    for option in MOUNT_OPTIONS:
        option.add_to(mount)
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument(
        "--no-xattrs",
        action="store_true",
        help="no extended attributes (saves one round trip per file in ls -l)",
    )
    _add_transport_options(mount, argv)
    mount.set_defaults(run=cmd_mount)

    unmount = commands.add_parser("umount", help="unmount (also a dead mount left by a killed daemon)")
    unmount.add_argument("mountpoint")
    unmount.set_defaults(run=cmd_umount)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of every source: user, cache, timeout, verbosity."""
    parser.add_argument("--user", help="user name (or alias token); the password comes from XNAT_PASS or a prompt")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default {default_cache_dir()})")
    for option in SOURCE_OPTIONS:
        option.add_to(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (debug)")


def _add_transport_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Add the options the transport of ``argv``'s source declares (of every transport for ``--help``)."""
    if not argv or argv[0] != "mount":
        return
    if "-h" in argv or "--help" in argv:
        classes = list(dict.fromkeys(transport_classes().values()))
    else:
        source = next((arg for arg in argv[1:] if "://" in arg), None)
        try:
            classes = [transport_class(source)] if source else []
        except UnknownSchemeError:
            classes = []  # the mount itself says so, in one line
    taken = {flag for action in parser._actions for flag in action.option_strings}
    for cls in classes:
        declared = [option for option in getattr(cls, "options", ()) if option.flag not in taken]
        if declared:
            schemes = ", ".join(f"{scheme}://" for scheme in getattr(cls, "schemes", []))
            group = parser.add_argument_group(f"options of {schemes} sources")
            for option in declared:
                option.add_to(group)
                taken.add(option.flag)


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount: in the foreground (``-f``, or as the daemon), else start the daemon and wait for it."""
    from xnatfs.mount import check_mountpoint, start_daemon  # loads libfuse 3, or says it is missing

    cache_dir = args.cache_dir or default_cache_dir()
    _warn_allow_other(args)
    private_cache_and_log(cache_dir, args.log_file)
    if args.ready_fd is not None or args.foreground:
        return _mount_foreground(args, cache_dir)
    mountpoint = check_mountpoint(args.mountpoint)
    env = dict(os.environ)
    if getattr(transport_class(args.source), "needs_credentials", False):
        # Asked here, where a terminal may be: the daemon finds them in its environment, never in argv.
        user, password = resolve_credentials(args.source, args.user)
        if user is not None:
            env["XNAT_USER"], env["XNAT_PASS"] = user, password or ""
    log_file = os.path.abspath(args.log_file or default_log_file(cache_dir))
    # Startup includes one listing of the root: allow for its retries on top of the mount itself.
    start_daemon(args.argv, env, log_file, timeout=args.timeout + 30)
    if sys.stderr.isatty():
        print(
            f"xnatfs: {args.source} mounted at {mountpoint} (log: {log_file}; xnatfs umount {mountpoint} to unmount)",
            file=sys.stderr,
        )
    return 0


def _mount_foreground(args: argparse.Namespace, cache_dir: str) -> int:
    from xnatfs.mount import check_mountpoint, run

    privacy.process_umask(privacy.is_group_shared(cache_dir))  # all the daemon writes is private
    # The daemon logs to the log file; -f to the file the user named, else to stderr.
    setup_logging(args.verbose, args.log_file or (default_log_file(cache_dir) if args.ready_fd is not None else None))
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
            os.write(args.ready_fd, (one_line(error) + "\n").encode())
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
    """Return the transport for ``source`` with the command's options (credentials resolved).

    Raises UnknownSchemeError, CredentialsError, or what the transport raises for a bad source.
    """
    from xnatfs.cache import Cache

    cls = transport_class(source)
    opts: dict[str, Any] = {
        "timeout": args.timeout,
        "ttl": args.ttl,
        "cache": Cache(cache_dir, args.cache_size),
        "catalog": True,  # listings kept in the cache folder: remounts and offline mounts need no server
        "offline": args.offline,
        "listing_jobs": args.listing_jobs,
    }
    for option in getattr(cls, "options", ()):
        opts[option.dest] = getattr(args, option.dest)
    if getattr(cls, "needs_credentials", False):
        opts["user"], opts["password"] = resolve_credentials(source, args.user)
    return get_transport(source, opts=opts)


def parse_fuse_options(values: list[str]) -> dict[str, str | bool]:
    """Return ``-o a,b=c`` options as ``{"a": True, "b": "c"}``."""
    fuse_options: dict[str, str | bool] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, setting = item.partition("=")
            fuse_options[key] = setting if sep else True
    fuse_options.pop("rw", None)  # the mount is read-only
    return fuse_options


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount (also a dead mount left by a killed daemon)."""
    from xnatfs.mount import umount

    umount(args.mountpoint)
    return 0


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
