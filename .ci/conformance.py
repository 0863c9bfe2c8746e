#!/usr/bin/env python3
"""Run the reference suite against refax and fail when the pass rate drops below the floor.

The floor is the line ``conformance floor: R%`` in ``docs/deviations.md``: the figure last
recorded there. Raise it (never lower it silently) when a change makes more tests pass.

usage: .ci/conformance.py [--tool PATH] [extra arguments for the tool]
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TOOL = ROOT.parent / "shared" / "conformance" / "run.py"
FLOOR_RE = re.compile(r"^conformance floor: ([0-9.]+)%", re.M)
RATE_RE = re.compile(r"^conformance: (\d+) passed of (\d+) \(pass rate ([0-9.]+)%\)", re.M)


def main(argv: list[str]) -> int:
    tool, explicit = DEFAULT_TOOL, False
    if argv[:1] == ["--tool"]:
        tool, argv, explicit = pathlib.Path(argv[1]), argv[2:], True
    if not tool.exists():
        print(f"conformance: the tool is not at {tool}; pass --tool PATH", file=sys.stderr)
        if explicit:
            return 2
        # A checkout without the shared folder beside it cannot measure anything: say so
        # loudly, but do not fail the other checks for a missing tool.
        print("conformance: SKIPPED (no ../shared/conformance/run.py beside this checkout)")
        return 0
    floor_match = FLOOR_RE.search((ROOT / "docs" / "deviations.md").read_text())
    if floor_match is None:
        print("conformance: no 'conformance floor: R%' line in docs/deviations.md", file=sys.stderr)
        return 2
    floor = float(floor_match.group(1))
    cmd = [sys.executable, str(tool), "--python", str(ROOT / ".venv" / "bin" / "python"), *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    rate_match = RATE_RE.search(result.stdout)
    if rate_match is None:
        print(f"conformance: the tool printed no pass rate (exit {result.returncode})")
        return 1
    rate = float(rate_match.group(3))
    if rate < floor:
        print(f"conformance: pass rate {rate:.1f}% is below the recorded floor {floor:.1f}%")
        return 1
    print(f"conformance: pass rate {rate:.1f}% meets the recorded floor {floor:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
