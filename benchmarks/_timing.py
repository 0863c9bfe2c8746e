"""Shared timing helpers for the benchmark suites.

``measure`` times a callable the same way for every framework so that ratios are comparable:

* ``time.perf_counter`` clock;
* one warm-up call first (jit compilation, class-level caches, lazy imports);
* the garbage collector is collected once, then disabled while timing;
* ``number`` calls per repeat, chosen so that one repeat lasts at least ``MIN_REPEAT_S``
  (sub-microsecond clock noise stays negligible) -- only when there is no per-call ``setup``;
* ``repeats`` chosen so that the whole measurement lasts about ``target_s`` (0.3 s by default,
  ``quick`` lowers it), never fewer than ``min_repeats``;
* the reported figure is the median over repeats of the per-call time.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIN_REPEAT_S = 200e-6  # a repeat shorter than this is made of several calls
MAX_NUMBER = 1 << 16


@dataclass(frozen=True)
class Timing:
    """Result of one measurement; times are seconds per call."""

    median: float
    q1: float
    q3: float
    repeats: int
    number: int

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = +-5 % noise)."""
        return (self.q3 - self.q1) / self.median if self.median else 0.0


@dataclass(frozen=True)
class Settings:
    target_s: float = 0.3  # total timed time per measurement
    min_repeats: int = 5
    max_repeats: int = 2000

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        return cls(target_s=0.05, min_repeats=3, max_repeats=200) if quick else cls()


def _run(fn: Callable[[], Any], setup: Callable[[], Any] | None, number: int) -> float:
    """One repeat: ``number`` calls of ``fn`` (after ``setup``, untimed); seconds in total."""
    if setup is not None:
        setup()
    clock = time.perf_counter
    if number == 1:
        t0 = clock()
        fn()
        return clock() - t0
    loop = range(number)
    t0 = clock()
    for _ in loop:
        fn()
    return clock() - t0


def measure(
    fn: Callable[[], Any],
    *,
    setup: Callable[[], Any] | None = None,
    settings: Settings | None = None,
) -> Timing:
    """Median per-call time of ``fn()``.

    Args:
      fn: the operation, called without arguments; its result is discarded.
      setup: called (untimed) before every timed call of ``fn``, e.g. to clear a cache so that
        each call is a first call. With a setup every repeat is a single call.
      settings: repeat policy; ``Settings()`` by default.
    """
    s = settings or Settings()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        _run(fn, setup, 1)  # warm-up
        # Calibrate: grow the per-repeat call count until a repeat is long enough to time.
        number = 1
        t = _run(fn, setup, 1)
        if setup is None:
            while t < MIN_REPEAT_S and number < MAX_NUMBER:
                number = min(MAX_NUMBER, number * max(2, int(MIN_REPEAT_S / max(t, 1e-9))))
                t = _run(fn, None, number)
        repeats = int(s.target_s / max(t, 1e-9))
        repeats = max(s.min_repeats, min(s.max_repeats, repeats))
        times = [_run(fn, setup, number) / number for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
        gc.collect()
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
    else:
        q1, q3 = min(times), max(times)
    return Timing(statistics.median(times), q1, q3, repeats, number)


def fmt_time(seconds: float | None) -> str:
    """Human-readable duration with three significant figures (``12.3 us``, ``4.56 ms``)."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:#.3g} {unit}"
    return f"{seconds / 1e-9:#.3g} ns"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:#.3g}x" if ratio < 100 else f"{ratio:.0f}x"


@dataclass
class SuiteResult:
    """What a suite hands back to ``run.py``: one table plus notes and failed targets."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]
    failed: list[str]


def format_table(headers: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """A left-aligned first column and right-aligned others, as text or as a Markdown table."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    if markdown:
        rule = "|" + "|".join(
            ("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        rule += "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
