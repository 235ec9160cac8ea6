"""``xnatfs download``, and operating a mount: ``prefetch``, ``status``, ``cache``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xnatfs import options
from xnatfs.cli.common import parse_size, setup_logging
from xnatfs.credentials import resolve_credentials
from xnatfs.options import default_cache_dir


def add_parsers(commands: Any) -> None:
    """Add ``download``, ``prefetch``, ``status`` and ``cache`` to the command line."""
    download = commands.add_parser("download", help="download an experiment's resources and unzip them")
    download.add_argument("source", help="the XNAT server, http(s)://host[:port][/context]")
    download.add_argument("project", help="project ID")
    download.add_argument("experiment", help="experiment label or ID")
    download.add_argument("--resource", default="DICOM", help="resource label, or ALL (default DICOM)")
    download.add_argument("--dest", default=".", help="destination folder (default: here)")
    download.add_argument("--user", help="user name; the password comes from XNAT_PASS or a prompt")
    download.add_argument("--timeout", type=float, default=options.TIMEOUT, help="bound on every network wait (s)")
    download.add_argument("-v", "--verbose", action="store_true")
    download.set_defaults(run=cmd_download)

    prefetch = commands.add_parser(
        "prefetch",
        help="download everything below paths of a mount into its cache",
        description="Download everything below each PATH (inside a live xnatfs mount) into the mount's cache, "
        "done by the mount's daemon. Exit 0 only when all of it is cached.",
    )
    prefetch.add_argument("paths", nargs="+", metavar="PATH")
    prefetch.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=options.PREFETCH_JOBS,
        metavar="N",
        help=f"downloads in parallel (default {options.PREFETCH_JOBS})",
    )
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
    verify.add_argument("--timeout", type=float, default=options.TIMEOUT, help="bound on every network wait (s)")
    cache.set_defaults(run=cmd_cache)


def cmd_download(args: argparse.Namespace) -> int:
    """Download an experiment's resources; print the folder they are in."""
    from xnatfs.download import download_experiment

    setup_logging(args.verbose, None)
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


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Have a mount's daemon download everything below the paths; 0 once all of it is cached."""
    from xnatfs.prefetch import run as prefetch

    return prefetch(args.paths, jobs=args.jobs)


def cmd_status(args: argparse.Namespace) -> int:
    """Print what a mount is doing (or the live mounts)."""
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
    """Inspect, clean or verify a cache directory."""
    from xnatfs import cachetool

    return cachetool.run(args, sys.stdout)
