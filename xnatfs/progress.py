"""A one-line progress bar for downloads on a terminal: bytes, rate, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    """Return ``count`` bytes as ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class Progress:
    """Draws ``label  12.3 MB / 40.0 MB  31%  8.1 MB/s  ETA 0:03`` at most ten times a second.

    Does nothing when disabled (output is not a terminal). ``total`` may be None (no ETA).
    """

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, out: TextIO | None = None):
        self.label = label
        self.total = total
        self.enabled = enabled
        self.out = out or sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0

    def update(self, count: int) -> None:
        """Add ``count`` bytes."""
        self.done += count
        if self.enabled and time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw()
            self.out.write("\n")
            self.out.flush()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        elapsed = max(self._drawn - self._start, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}  {human_bytes(self.done)}"
        if self.total:
            text += f" / {human_bytes(self.total)}  {min(self.done / self.total, 1):4.0%}"
        text += f"  {human_bytes(rate)}/s"
        if self.total and rate > 0:
            left = max(self.total - self.done, 0) / rate
            text += f"  ETA {int(left // 60)}:{int(left % 60):02d}"
        self.out.write("\r" + text.ljust(78))
        self.out.flush()
