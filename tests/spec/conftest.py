import pytest

from tests.spec._runner import SPEC_DIR, normalize, run_document

_RESULTS: dict[str, list] = {}


def spec_cells(name: str) -> list:
    if name not in _RESULTS:
        _RESULTS[name] = run_document(name)
    return _RESULTS[name]


def check_cell(name: str, index: int) -> None:
    if not (SPEC_DIR / name).exists():
        pytest.skip(f"spec document {name} not found beside the repository")
    cell = spec_cells(name)[index]
    assert cell.error is None, f"cell {index} raised:\n{cell.error}\n--- source ---\n{cell.source}"
    if cell.expected is not None:
        assert normalize(cell.output) == normalize(cell.expected), (
            f"cell {index} printed:\n{cell.output}\nexpected:\n{cell.expected}"
        )
