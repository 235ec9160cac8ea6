"""Byte counts for people: ``human_bytes`` and a progress bar on a terminal (tqdm's)."""

from __future__ import annotations

import shutil
import sys
from typing import Any, TextIO

from tqdm import tqdm


def human_bytes(count: float) -> str:
    """Return ``count`` bytes as ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def byte_bar(label: str, total: int | None, out: TextIO | None = None, enabled: bool = True, **options: Any) -> tqdm:
    """Return a tqdm bar counting bytes (``update(n)``, ``close()``): label, size, rate and ETA.

    Draws nothing when ``enabled`` is false or ``out`` (default stderr) is not a terminal. ``total``
    may be None (no ETA). ``options`` go to tqdm as they are.
    """
    out = out or sys.stderr
    size = shutil.get_terminal_size((100, 24))
    settings: dict[str, Any] = {
        "total": total,
        "desc": label,
        "unit": "B",
        "unit_scale": True,
        "unit_divisor": 1000,
        "file": out,
        "disable": not (enabled and out.isatty()),
        # A terminal that reports size 0 (e.g. under script(1)) would hide the bar: assume 100x24.
        "ncols": min(size.columns, 120),
        "nrows": max(size.lines, 2),
        "mininterval": 0.1,
    }
    return tqdm(**{**settings, **options})
