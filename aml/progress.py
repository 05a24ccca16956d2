"""A small stderr progress bar (no dependency), silent when disabled or when stderr is not wanted."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts work done and redraws one stderr line at most ~5 times a second."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0
        self.start = self._last = time.perf_counter()
        self.postfix = ""

    def update(self, k: int = 1, postfix: str | None = None) -> None:
        self.n += k
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.n >= self.total):
            self._last = now
            self._draw(now)

    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self.start, 1e-9)

    def _draw(self, now: float) -> None:
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        msg = (
            f"\r{self.desc} [{bar:<24}] {self.n}/{self.total} {self.rate():.1f} {self.unit}/s"
            f" {now - self.start:.0f}s {self.postfix}"
        )
        sys.stderr.write(msg[:160])
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()
