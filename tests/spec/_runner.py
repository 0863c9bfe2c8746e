"""Runs the code cells of a spec document (``../shared/spec/*.md``) and records their output.

The spec files are the user's documents; they are read at test time (never copied into the
repository). Each ```python cell runs in one shared namespace, with ``from flax import nnx``
replaced by ``from refax import nnx``; a cell ending in an expression prints its repr, like a
notebook. ``nnx.display`` renders (so it is exercised) but prints nothing, because the recorded
outputs omit the treescope HTML it produced.
"""

from __future__ import annotations

import ast
import contextlib
import io
import pathlib
import re
import traceback
from dataclasses import dataclass

SPEC_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "spec"

_CELL = re.compile(r"```python[^\n]*\n(.*?)```(?:\s*Recorded output:\s*```text\n(.*?)```)?", re.S)


@dataclass
class Cell:
    index: int
    source: str
    expected: str | None
    output: str = ""
    error: str | None = None


def load_cells(name: str) -> list[Cell]:
    text = (SPEC_DIR / name).read_text()
    cells = []
    for m in _CELL.finditer(text):
        source, expected = m.group(1), m.group(2)
        if "skip-execution" in m.group(0).split("\n", 1)[0]:
            continue
        cells.append(Cell(len(cells), source, expected))
    return cells


def _port(source: str) -> str:
    return source.replace("from flax import nnx", "from refax import nnx")


def _run_cell(source: str, namespace: dict) -> None:
    tree = ast.parse(source)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        tree.body = tree.body[:-1]
        exec(compile(tree, "<spec>", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), "<spec>", "eval"), namespace)
        if value is not None:
            print(repr(value))
    else:
        exec(compile(tree, "<spec>", "exec"), namespace)


def run_document(name: str) -> list[Cell]:
    import refax
    from refax import nnx

    cells = load_cells(name)
    namespace: dict = {"__name__": "__spec__"}
    original_display = refax.display

    def quiet_display(*args):
        with contextlib.redirect_stdout(io.StringIO()):
            original_display(*args)

    refax.display = nnx.display = quiet_display
    try:
        for cell in cells:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    _run_cell(_port(cell.source), namespace)
            except Exception:
                cell.error = traceback.format_exc(limit=-3)
            cell.output = buf.getvalue()
    finally:
        refax.display = nnx.display = original_display
    return cells


def normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())
