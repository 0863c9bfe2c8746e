"""The docstrings of the lifted transforms and their helpers stay complete and true.

``help(nnx.X)`` is where most users meet a transform, so each public transform (and each
helper used with them) must have an ``Args:`` section and at least one doctest example, and
every example must run and print what it shows.
"""

from __future__ import annotations

import doctest

import pytest

from refax import nnx
from refax.nnx.transforms import general

NAMES = [
    # lifted transforms
    "jit",
    "grad",
    "value_and_grad",
    "vmap",
    "pmap",
    "shard_map",
    "scan",
    "while_loop",
    "fori_loop",
    "cond",
    "switch",
    "remat",
    "checkpoint",
    "eval_shape",
    "checkify",
    "make_jaxpr",
    "vjp",
    "jvp",
    "custom_vjp",
    "custom_vjp.defvjp",
    # partial application
    "jit_partial",
    "cached_partial",
    # random streams for vectorised transforms
    "split_rngs",
    "fork_rngs",
    "with_rngs",
    # prefixes and metadata
    "StateAxes",
    "StateSharding",
    "DiffState",
    "Carry",
    "prefix",
    "transform_metadata",
    # hand-lifted transforms
    "general.split_inputs",
    "general.merge_inputs",
]

# A marker constant takes no arguments: its docstring has no ``Args:`` section.
NO_ARGS = {"Carry"}


def resolve(name: str):
    if name.startswith("general."):
        return getattr(general, name.removeprefix("general."))
    if name == "custom_vjp.defvjp":  # the method of what nnx.custom_vjp returns
        return type(nnx.custom_vjp(lambda x: x)).defvjp
    return getattr(nnx, name)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_examples_run(name):
    obj = resolve(name)
    doc = obj.__doc__ or ""
    assert doc.strip(), f"nnx.{name} has no docstring"
    if name not in NO_ARGS:
        assert "\nArgs:" in "\n" + "\n".join(line.strip() for line in doc.splitlines()), (
            f"the docstring of nnx.{name} has no Args: section"
        )
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"nnx.{name}", globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0, f"the docstring of nnx.{name} has no example"
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    failed = runner.summarize(verbose=False).failed
    assert failed == 0, "".join(report)
