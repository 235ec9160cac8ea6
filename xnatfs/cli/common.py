"""What the command groups share: sizes, logging, one-line errors, the private cache folder."""

from __future__ import annotations

import argparse
import logging
import os
import re

from xnatfs import privacy


def parse_size(text: str) -> int:
    """Return bytes for ``500M``, ``10G``, ``1.5T`` or a plain number; raise ArgumentTypeError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 10G)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


def setup_logging(verbose: bool, log_file: str | None) -> None:
    """Send the log to ``log_file`` (else stderr), at DEBUG when ``verbose``."""
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Connection pool chatter is noise at INFO; requests never logs credentials either way.
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def one_line(error: BaseException) -> str:
    """Return the first line of what ``error`` says (``file: reason`` for an OSError)."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    return text.splitlines()[0]


def default_log_file(cache_dir: str) -> str:
    """Return where a mount in the background logs unless ``--log-file`` says otherwise."""
    return os.path.abspath(os.path.join(cache_dir, "xnatfs.log"))


def private_cache_and_log(cache_dir: str, log_file: str | None) -> None:
    """Create the cache directory and the log before anything else does, private (see xnatfs.privacy)."""
    shared = privacy.is_group_shared(cache_dir)
    privacy.secure_dir(cache_dir, shared)
    log_path = os.path.abspath(log_file or default_log_file(cache_dir))
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    privacy.private_file(log_path, shared)
