"""examples/demo.py: quick runs on one device, eight simulated devices and two processes.

Each run is a subprocess (the device count is fixed when JAX starts its CPU backend); the demo
checks itself that the restored checkpoint predicts exactly what the trained model does and
exits non-zero otherwise.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def run_demo(out: pathlib.Path, *args: str) -> str:
    cmd = [sys.executable, str(DEMO), "--quick", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def check_outputs(stdout: str, out: pathlib.Path, devices: int, processes: int) -> None:
    assert f"{devices} device(s) in {processes} process(es)" in stdout
    assert "Total Parameters: 151,692" in stdout  # the nnx.tabulate summary
    assert "restored predictions match" in stdout
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", stdout).group(1))
    assert accuracy > 0.6, stdout  # 30 steps; chance is 0.1
    assert (out / "checkpoint" / "_CHECKPOINT_METADATA").is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_split():
    spec = importlib.util.spec_from_file_location("refax_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    x_train, y_train, x_test, y_test = demo.digits()
    assert x_train.shape == (1797 - demo.TEST_SIZE, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert set(y_train) == set(y_test) == set(range(10))
    assert 0.0 <= x_train.min() < x_train.max() <= 1.0


def test_quick_single_device(tmp_path):
    check_outputs(run_demo(tmp_path), tmp_path, devices=1, processes=1)


def test_quick_eight_devices(tmp_path):
    check_outputs(run_demo(tmp_path, "--devices", "8"), tmp_path, devices=8, processes=1)


@pytest.mark.slow
def test_quick_two_processes(tmp_path):
    stdout = run_demo(tmp_path, "--processes", "2")
    check_outputs(stdout, tmp_path, devices=8, processes=2)
    assert "[Gloo]" not in stdout  # native notices are silenced
