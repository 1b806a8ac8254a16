"""The training loop's console output: one progress line per epoch, or a live one on a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A plain progress line on stderr: in place on a terminal, one line per epoch otherwise."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.prefix = prefix
        self._last = 0.0

    def update(self, epoch: int, epochs: int, i: int, n: int, loss: float, acc: float, rate: float) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and i < n:
            return
        self._last = now
        width = 20
        fill = int(width * i / max(n, 1))
        bar = "#" * fill + "." * (width - fill)
        self.stream.write(f"\r{self.prefix}epoch {epoch}/{epochs} [{bar}] {i}/{n} loss {loss:.4f} "
                          f"acc {100 * acc:.2f}% {rate:,.0f} samples/s ")
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(self.prefix + text + "\n")
        self.stream.flush()
