"""Shared timing helpers for the benchmark suites.

``measure`` times a callable the same way for every framework so that ratios are comparable:

* ``time.perf_counter`` clock;
* one warm-up call first (jit compilation, class-level caches, lazy imports);
* the garbage collector is collected once, then disabled while timing;
* ``number`` calls per repeat, chosen so that one repeat lasts at least ``MIN_REPEAT_S``
  (sub-microsecond clock noise stays negligible) -- only when there is no per-call ``setup``;
* ``repeats`` chosen so that the measurement lasts about ``target_s``, never fewer than
  ``min_repeats``;
* the reported figure is the median over repeats of the per-call time.

On a shared machine a burst of load can hit one measurement and spare the next, which skews
ratios. Suites therefore measure in ``Settings.rounds`` interleaved rounds (every figure once
per round, with ``Settings.per_round()``) and ``pool`` the samples: each median is then drawn
from the whole run, and a burst hits all figures alike.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

MIN_REPEAT_S = 200e-6  # a repeat shorter than this is made of several calls
MAX_NUMBER = 1 << 16


@dataclass(frozen=True)
class Timing:
    """Result of a measurement; ``samples`` are seconds per call, one per repeat."""

    samples: tuple[float, ...]
    number: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = +-5 % noise)."""
        if len(self.samples) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median if self.median else 0.0


def pool(timings: Sequence[Timing]) -> Timing:
    """One Timing holding the samples of several measurements of the same operation."""
    return Timing(tuple(x for t in timings for x in t.samples), max(t.number for t in timings))


@dataclass(frozen=True)
class Settings:
    target_s: float = 0.45  # total timed time per figure, over all rounds
    min_repeats: int = 9  # per figure, over all rounds
    max_repeats: int = 3000
    rounds: int = 3

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(target_s=0.05, min_repeats=3, max_repeats=200, rounds=1)
        return cls()

    def per_round(self) -> Settings:
        """The settings of one of ``rounds`` interleaved measurements."""
        r = self.rounds
        return replace(
            self,
            target_s=self.target_s / r,
            min_repeats=max(1, math.ceil(self.min_repeats / r)),
            max_repeats=max(1, self.max_repeats // r),
            rounds=1,
        )


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
      settings: repeat policy; ``Settings()`` by default (``rounds`` is ignored here: see
        ``measure_interleaved``).
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
        times = tuple(_run(fn, setup, number) / number for _ in range(repeats))
    finally:
        if gc_was_enabled:
            gc.enable()
        gc.collect()
    return Timing(times, number)


Job = tuple[Callable[[], Any], Callable[[], Any] | None]  # (fn, setup)


def measure_interleaved(jobs: dict[Any, Job], settings: Settings) -> dict[Any, Timing]:
    """Times every ``(fn, setup)`` job in ``settings.rounds`` interleaved rounds, pooled.

    Each round measures all jobs once with ``settings.per_round()``; odd rounds run in reverse
    order so that no job always follows the same neighbour.
    """
    per_round = settings.per_round()
    samples: dict[Any, list[Timing]] = {key: [] for key in jobs}
    order = list(jobs)
    for r in range(settings.rounds):
        for key in order if r % 2 == 0 else reversed(order):
            fn, setup = jobs[key]
            samples[key].append(measure(fn, setup=setup, settings=per_round))
    return {key: pool(ts) for key, ts in samples.items()}


def _sig3(x: float) -> str:
    """``x`` with three significant figures and no exponent (``161``, ``9.66``, ``0.0395``)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    x = float(f"{x:.3g}")  # round first so that 0.99996 becomes 1.00, not 1.000
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_time(seconds: float | None) -> str:
    """Human-readable duration with three significant figures (``12.3 us``, ``4.56 ms``)."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale * 0.9995:
            return f"{_sig3(seconds / scale)} {unit}"
    return f"{_sig3(seconds / 1e-9)} ns"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{_sig3(ratio)}x"


@dataclass
class Table:
    """An extra table of a suite, printed after its main one under ``title``."""

    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class SuiteResult:
    """What a suite hands back to ``run.py``: a table plus notes and failed targets.

    ``tables``: further tables (optional), printed after the main one.
    """

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]
    failed: list[str]
    tables: list[Table] = field(default_factory=list)


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
