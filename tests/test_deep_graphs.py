"""Graph walks are iterative: a chain of 10,000 nested Modules goes through split / merge,
clone, update, nnx.jit and nnx.grad at Python's default recursion limit."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx

DEPTH = 10_000


class Node(nnx.Module):
    def __init__(self, child, i):
        self.child = child
        self.w = nnx.Param(jnp.asarray(float(i)))
        self.i = i


@pytest.fixture(scope="module")
def chain():
    assert sys.getrecursionlimit() <= 1000 * 10  # the default, or near it: no raised limit
    m = None
    for i in range(DEPTH):
        m = Node(m, i)
    return m


def _depth(m) -> int:
    n = 0
    while m is not None:
        n, m = n + 1, m.child
    return n


def test_split_merge_clone_update(chain):
    graphdef, state = nnx.split(chain)
    assert graphdef.num_nodes == 2 * DEPTH
    rebuilt = nnx.merge(graphdef, state)
    assert _depth(rebuilt) == DEPTH and rebuilt.child.child.w is chain.child.child.w
    copy = nnx.clone(chain)
    assert _depth(copy) == DEPTH and copy.w is not chain.w
    assert nnx.graphdef(copy) == graphdef and hash(nnx.graphdef(copy)) == hash(graphdef)
    assert nnx.split(chain)[0] is nnx.split(chain)[0]  # served by the walk cache
    state["child"]["child"]["w"] = nnx.Param(jnp.asarray(-1.0))
    nnx.update(copy, state)
    assert float(copy.child.child.w[...]) == -1.0
    assert len(list(nnx.iter_graph(copy))) > 2 * DEPTH
    repr(graphdef)


def test_jit_and_grad(chain):
    @nnx.jit
    def bump(m):
        m.w[...] += 1.0
        m.child.child.w[...] += 1.0
        return m.w[...]

    top = float(chain.w[...])
    assert float(bump(chain)) == top + 1
    assert float(bump(chain)) == top + 2

    grads = nnx.grad(lambda m: m.w[...] * 2.0 + m.child.w[...])(chain)
    np.testing.assert_allclose(grads["w"][...], 2.0)
    np.testing.assert_allclose(grads["child"]["w"][...], 1.0)
    np.testing.assert_allclose(grads["child"]["child"]["child"]["w"][...], 0.0)
