"""Per-step time of the train_step variants, interleaved in many short rounds.

On a machine whose speed swings (shared VMs), the 1.2x train-step targets of ``make bench``
can flip from run to run. This takes 60 rounds of 10 steps per variant, interleaved, and
prints the median and 25th percentile of each; run it against another checkout for an A/B of
the per-call overhead on the same machine in the same minutes:

    .venv/bin/python benchmarks/step_ab.py 16
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/step_ab.py 16
"""

from __future__ import annotations

import statistics
import sys
import time

from train_step import Setup

import refax


def main(depth: int, rounds: int = 60, steps: int = 10) -> None:
    setup = Setup(depth, refax, None)
    calls = setup.calls
    for call in calls.values():
        for _ in range(20):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                call()
            times[name].append((time.perf_counter() - t0) / steps * 1e6)
    base = statistics.median(times["pure"])
    print(f"depth {depth}, refax at {refax.__file__}")
    for name, ts in times.items():
        med, p25 = statistics.median(ts), sorted(ts)[len(ts) // 4]
        print(f"{name:12s} median {med:8.0f} us ({med / base:.2f}x)   p25 {p25:8.0f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
