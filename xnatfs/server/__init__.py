"""`xnatfs serve`: an embedded XNAT-compatible HTTP server for demos and tests.

It speaks enough of XNAT's REST API (login, listings, downloads, zips, uploads, DICOM import) that the
`xnat` client cannot tell it from XNAT. It serves a folder laid out as in README-data.md, or, without
--data, a generated demo archive. The CLI calls `add_serve_arguments` and `run_serve`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile

DEFAULT_PASSWORD_ENV = "XNATFS_SERVE_PASSWORD"
DEFAULT_PASSWORD = "admin"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `xnatfs serve` to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one")
    parser.add_argument(
        "--data", metavar="DIR", help="serve this folder (layout: see README); default: a generated demo archive"
    )
    parser.add_argument("--user", default="admin", help="the user name clients log in with (default admin)")
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help=f"read the password from environment variable VAR (default: ${DEFAULT_PASSWORD_ENV}, else "
        f"'{DEFAULT_PASSWORD}'); passwords are never taken from the command line",
    )
    parser.add_argument(
        "--require-login",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="XNAT's requireLogin site setting (default on); with --no-require-login a request with neither "
        "a live session nor credentials is served as the guest user, who sees public projects only",
    )
    parser.add_argument(
        "--max-failed-logins",
        type=int,
        default=20,
        metavar="N",
        help="failed logins in a row that lock the account (XNAT's default 20)",
    )
    parser.add_argument(
        "--lockout-seconds",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long a locked account stays locked (XNAT's default: an hour)",
    )
    parser.add_argument(
        "--zip-compression",
        type=int,
        choices=range(10),
        default=0,
        metavar="LEVEL",
        help="XNAT's zipCompressionMethod: 0 stores ZIP entries (the default), 1-9 deflates them "
        "(with data descriptors); a request's ?compression=N overrides it",
    )
    parser.add_argument(
        "--checksums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="XNAT's checksums site setting (default on): file listings carry each file's MD5 digest",
    )
    parser.add_argument(
        "--ignore-compression-param",
        action="store_true",
        help="use --zip-compression even when a request asks for ?compression= (a server that always deflates)",
    )
    parser.add_argument(
        "--test-hooks",
        action="store_true",
        help="enable the /_test/ endpoints (request log, injected faults); for test suites only",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); returns the exit status."""
    # Imported here so `xnatfs --help` stays fast and does not need numpy/pydicom.
    from .app import XnatHTTPServer
    from .archive import Archive
    from .auth import Auth
    from .demo import generate_demo_archive
    from .faults import TestHooks

    if args.password_env and args.password_env not in os.environ:
        print(f"xnatfs serve: environment variable {args.password_env} is not set", file=sys.stderr)
        return 2
    password = os.environ.get(args.password_env or DEFAULT_PASSWORD_ENV) or DEFAULT_PASSWORD
    demo_dir = None
    if args.data is None:
        demo_dir = tempfile.mkdtemp(prefix="xnatfs-demo-")
        generate_demo_archive(demo_dir)
    try:
        archive = Archive(args.data or demo_dir)
    except FileNotFoundError as error:
        print(f"xnatfs serve: {error}", file=sys.stderr)
        return 2
    # SIGTERM (from `kill` or a test harness) ends the server like Ctrl-C, so the demo folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server = XnatHTTPServer(
            (args.host, args.port),
            archive,
            Auth(args.user, password, args.max_failed_logins, args.lockout_seconds),
            TestHooks() if args.test_hooks else None,
            require_login=args.require_login,
            zip_compression=args.zip_compression,
            checksums=args.checksums,
            ignore_compression_param=args.ignore_compression_param,
        )
    except OSError as error:
        print(f"xnatfs serve: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    try:
        print(
            f"xnatfs serve: listening on http://{args.host}:{server.server_address[1]} (data: {archive.root})",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if demo_dir:
            shutil.rmtree(demo_dir, ignore_errors=True)
    return 0
