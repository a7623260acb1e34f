"""Progress of long loops: a tqdm bar on a terminal, and in a log file a line at most every 30 s and at 25/50/75/100%."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # longest silence between two progress lines in a log file
MILESTONES = (0.25, 0.5, 0.75, 1.0)  # fractions of the total that always get a line


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "images",
             logger: logging.Logger | None = None, disable: bool = False, leave: bool | None = None,
             interval: float | None = None, clock: Callable[[], float] = time.monotonic):
    """A tqdm bar when stderr is a terminal (as the Trainer shows), else a ProgressLog writing to `logger`.

    Used like tqdm: iterate over it, or `with progress(total=n, ...) as bar: bar.update(k)`. disable: neither.
    leave None (tqdm's rule): a bar opened under another one (validation under the Trainer's) goes when done.
    """
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    return ProgressLog(iterable, total=total, desc=desc, unit=unit, logger=logger,
                       interval=LOG_INTERVAL_S if interval is None else interval, clock=clock)


class ProgressLog:
    """Counts work done and logs `desc: done/total unit (pct), rate, time left`: when 25, 50, 75 and 100% are
    crossed, and whenever `interval` seconds passed since the last line, never more often."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "images",
                 logger: logging.Logger | None = None, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.logger = logger or logging.getLogger(__name__)
        self.interval, self.clock = interval, clock
        self.done = 0
        self.start = self.last_line = clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        now = self.clock()
        if self._crossed_milestone(before) or now - self.last_line >= self.interval:
            self.last_line = now
            self.logger.info("%s", self.describe(now))

    def _crossed_milestone(self, before: int) -> bool:
        if not self.total:
            return False
        return any(before < m * self.total <= self.done for m in MILESTONES)

    def describe(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else None
        count = f"{self.done:,}/{self.total:,} {self.unit}" if self.total else f"{self.done:,} {self.unit}"
        parts = [f"{self.desc}: {count}" + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{format_rate(rate)} {self.unit}/s" if rate else "rate n/a")
        if self.total and self.done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif self.total and rate:
            parts.append(f"about {format_duration((self.total - self.done) / rate)} left")
        return ", ".join(parts)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_rate(rate: float) -> str:
    """Three significant digits as a person writes them: 0.5, 10, 859, 1240 (never 1.24e+03)."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 5 s', '2 h 14 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
