"""Benchmark runner: ``python benchmarks/run.py [--quick] [--markdown] [--strict] [SUITE ...]``.

Each suite is a module in this folder exposing ``TITLE`` and ``run(settings) -> SuiteResult``
(see ``_timing.py``). Suites named on the command line run in that order; with none, every
suite in ``SUITES`` runs. To add a suite, drop ``benchmarks/<name>.py`` here and append its
name to ``SUITES``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Settings, format_table  # noqa: E402

SUITES = ("graph_ops", "train_step", "scan_layers", "transformer")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "unknown"


def _git_state() -> str:
    """``<commit> (+ uncommitted changes)`` of the checkout the figures were taken from."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+uncommitted changes"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> list[str]:
    import jax

    try:
        import flax

        flax_version = flax.__version__
    except ImportError:  # pragma: no cover - flax is the baseline, installed with [bench]
        flax_version = "not installed"
    import refax

    refax_version = getattr(refax, "__version__", None)
    if refax_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            refax_version = version("refax")
        except PackageNotFoundError:  # pragma: no cover
            refax_version = "?"
    if hasattr(os, "sched_getaffinity"):
        nproc = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - not Linux
        nproc = os.cpu_count()
    return [
        f"machine: {_cpu_model()} ({platform.machine()} {platform.system()}), nproc {nproc}",
        f"load average before the run: {_loadavg()}",
        f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.default_backend()}), flax {flax_version}, refax {refax_version} "
        f"(git {_git_state()})",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", help=f"suites to run (default: {' '.join(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (rough figures)")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target fails"
    )
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name in SUITES:
            print(f"{name}: {importlib.import_module(name).TITLE}")
        return 0
    names = args.suites or list(SUITES)
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            parser.error(f"unknown suite {name!r} (known: {', '.join(SUITES)})")

    settings = Settings.for_mode(args.quick)
    bullet = "- " if args.markdown else ""
    for line in environment():
        print(bullet + line)
    print(f"{bullet}mode: {'quick' if args.quick else 'full'} (median of repeats, {settings})")

    failed: list[str] = []
    for name, module in zip(names, modules):
        t0 = time.perf_counter()
        result = module.run(settings)
        elapsed = time.perf_counter() - t0
        print()
        heading = f"{name}: {result.title}"
        print(f"### {heading}" if args.markdown else f"== {heading}")
        print()
        print(format_table(result.headers, result.rows, markdown=args.markdown))
        print()
        for table in result.tables:
            print(f"#### {table.title}" if args.markdown else f"-- {table.title}")
            print()
            print(format_table(table.headers, table.rows, markdown=args.markdown))
            print()
        for note in result.notes:
            print(bullet + note)
        print(f"{bullet}suite time: {elapsed:.1f} s")
        failed += result.failed

    print()
    if failed:
        print(f"{len(failed)} target(s) FAIL:")
        for f in failed:
            print(f"  {f}")
    else:
        print("all targets PASS")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
