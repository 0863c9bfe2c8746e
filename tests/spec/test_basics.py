"""Every cell of ../shared/spec/basics.md runs with refax and prints what it recorded."""

import pytest

from tests.spec._runner import SPEC_DIR, load_cells
from tests.spec.conftest import check_cell

DOC = "basics.md"
N_CELLS = len(load_cells(DOC)) if (SPEC_DIR / DOC).exists() else 14
PENDING: dict[int, str] = {}


@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=PENDING[i]))
        if i in PENDING
        else i
        for i in range(N_CELLS)
    ],
)
def test_cell(index):
    check_cell(DOC, index)
