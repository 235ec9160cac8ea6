"""Byte counts for people: ``human_bytes`` and a progress bar on a terminal (tqdm's)."""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


def human_bytes(count: float) -> str:
    """Return ``count`` bytes as ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class SilentBar:
    """Stands in for a bar that would draw nothing: the same calls, no tqdm (which takes a while to import)."""

    def update(self, count: float = 1) -> None:
        pass

    def set_description_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def byte_bar(
    label: str, total: int | None, out: TextIO | None = None, enabled: bool = True, **options: Any
) -> tqdm | SilentBar:
    """Return a tqdm bar counting bytes (``update(n)``, ``set_description_str(text)``, ``close()``): label,
    size, rate and ETA.

    Draws nothing when ``enabled`` is false or ``out`` (default stderr) is not a terminal (a
    :class:`SilentBar` then). ``total`` may be None (no ETA). ``options`` go to tqdm as they are.
    """
    out = out or sys.stderr
    if not (enabled and out.isatty()):
        return SilentBar()
    from tqdm import tqdm

    size = shutil.get_terminal_size((100, 24))
    settings: dict[str, Any] = {
        "total": total,
        "desc": label,
        "unit": "B",
        "unit_scale": True,
        "unit_divisor": 1000,
        "file": out,
        # A terminal that reports size 0 (e.g. under script(1)) would hide the bar: assume 100x24.
        "ncols": min(size.columns, 120),
        "nrows": max(size.lines, 2),
        "mininterval": 0.1,
    }
    return tqdm(**{**settings, **options})
