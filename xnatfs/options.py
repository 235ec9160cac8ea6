"""Defaults of every setting, and the command-line options a transport declares.

The one place where a default is written: the CLI, the HTTP client, the download API and the
transports take theirs from here. A transport says what the ``mount`` command must offer for it
with two class attributes::

    options: ClassVar[tuple[Option, ...]] = (Option("--calling-aet", default=CALLING_AET, help="..."),)
    needs_credentials: ClassVar[bool] = True  # resolve --user / XNAT_USER / ~/.netrc for it

The value of each option reaches the transport as ``opts[option.dest]`` (``opts["calling_aet"]``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIMEOUT = 30.0  # seconds: bound on every network wait
TTL = 60.0  # seconds listings and attributes are trusted
LISTING_JOBS = 6  # listing requests in flight at most
PREFETCH_JOBS = 4  # downloads in parallel for xnatfs prefetch
CALLING_AET = "XNATFS"  # our AE title towards a PACS


def default_cache_dir() -> str:
    """Return ``$XDG_CACHE_HOME/xnatfs``, else ``~/.cache/xnatfs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xnatfs")


@dataclass(frozen=True)
class Option:
    """One command-line option of a transport: ``flag`` (``--calling-aet``) and argparse's settings."""

    flag: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """Return the name of the value in the parsed arguments and in the transport's ``opts``."""
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | Any) -> None:
        """Add this option to ``parser`` (an ``ArgumentParser`` or an argument group)."""
        settings: dict[str, Any] = {"default": self.default, "help": self.help, "metavar": self.metavar}
        if self.type is not None:
            settings["type"] = self.type
        parser.add_argument(self.flag, **settings)
