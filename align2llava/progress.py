"""Progress of long loops: a tqdm bar on a terminal and a log line every 30 s everywhere.

    with Progress(len(steps), "train question RM", "steps", log) as p:
        for step in steps:
            ...
            p.update(1, pairs=16, tok=9_200)

logs e.g. `train question RM: 12/40 steps (30%) in 31 s, 0.39 steps/s, 6.2 pairs/s, 3,560 tok/s,
ETA 72 s` every `every` seconds (ALIGN2LLAVA_PROGRESS_SECONDS, default 30) and a last line at the
end when any was logged, so runs under DVC, nohup or CI (no terminal, so no bar) show where they
are. The bar appears only on a terminal (tqdm's disable=None).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

ENV = "ALIGN2LLAVA_PROGRESS_SECONDS"
DEFAULT_EVERY = 30.0


def duration(seconds: float) -> str:
    """37 s, 4m10s, 1h02m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


class Progress:
    """Counts of one long loop, shown as a bar (terminal) and periodic log lines (always)."""

    def __init__(self, total: int | None, desc: str, unit: str, log: logging.Logger | None = None, *,
                 initial: int = 0, every: float | None = None, bar: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.log = log or logging.getLogger("align2llava.progress")
        self.every = float(os.environ.get(ENV, DEFAULT_EVERY)) if every is None else every
        self.clock = clock
        self.start = self.last = clock()
        self.initial = self.n = initial
        self.counts: dict[str, float] = {}
        self.status = ""  # e.g. "loss 0.412": shown after the rates
        self.logged = 0
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=None)

    def update(self, n: int = 1, **counts: float) -> None:
        self.n += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if self._bar is not None:
            if self.status:
                self._bar.set_postfix_str(self.status, refresh=False)
            self._bar.update(n)
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.logged += 1
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """`desc: n/total unit (pct) in T, rates, ETA`."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        done = self.n - self.initial
        head = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        if self.total:
            head += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {head} in {duration(elapsed)}", f"{_rate(done / elapsed)} {self.unit}/s"]
        parts += [f"{_rate(v / elapsed)} {k}/s" for k, v in self.counts.items()]
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {duration((self.total - self.n) * elapsed / done)}")
        if self.status:
            parts.append(self.status)
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.logged:
            self.log.info("%s (done)", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
