"""The ``xnatfs`` command: serve, mount, umount, demo, download, prefetch, status, cache.

Errors end the command with one line on stderr (``xnatfs: error: ...``) and a non-zero exit.
The mount (and with it libfuse) is imported only by the commands that mount: ``serve`` and
``download`` work on a machine without libfuse 3. One module per group of commands:
:mod:`~xnatfs.cli.mount` (mount, umount), :mod:`~xnatfs.cli.demo`, :mod:`~xnatfs.cli.operate`
(download, prefetch, status, cache); what they share is in :mod:`~xnatfs.cli.common`.
"""

from __future__ import annotations

import argparse
import sys

from xnatfs import __version__
from xnatfs.cli import demo, mount, operate
from xnatfs.cli.common import one_line, parse_size
from xnatfs.exceptions import XnatfsError
from xnatfs.transports import UnknownSchemeError

__all__ = ["build_parser", "main", "parse_size"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.argv = argv  # as the user gave them: the mount daemon gets the same
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (XnatfsError, UnknownSchemeError, OSError, ValueError, TimeoutError) as error:
        print(f"xnatfs: error: {one_line(error)}", file=sys.stderr)
        return 1


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Return the parser of the whole command line.

    ``argv`` picks the transport whose own options ``mount`` takes (see :func:`xnatfs.cli.mount.add_parser`).
    """
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
    mount.add_parsers(commands, argv or [])
    demo.add_parser(commands)
    operate.add_parsers(commands)
    return parser
