"""nnx.jit's fast path for flat positional arguments (``ArgPattern`` in _lift.py, ``_Fast`` in
_jit.py): a call whose arguments are each a graph node or a plain array/scalar, laid out as in
the previous call, skips flattening them. Every way the next call can differ must fall back
and give what a first call would give."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


class Counter(nnx.Module):
    def __init__(self, start: float = 0.0):
        self.count = nnx.BatchStat(jnp.asarray(start))
        self.w = nnx.Param(jnp.ones(2))


@nnx.jit
def step(m, x):
    m.count[...] += 1
    return m.w[...].sum() * x


def params_sum(m):
    return sum(jnp.sum(v[...]) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_two_models_alternating_each_get_their_own_updates():
    a, b = Counter(0.0), Counter(10.0)
    for i in range(1, 4):
        np.testing.assert_allclose(step(a, 2.0), 4.0)
        np.testing.assert_allclose(step(b, 3.0), 6.0)
        np.testing.assert_allclose(a.count[...], i)
        np.testing.assert_allclose(b.count[...], 10 + i)


def test_argument_layout_changes_fall_back():
    m = Counter()
    x = jnp.arange(2.0)
    np.testing.assert_allclose(step(m, x), [0.0, 2.0])  # array
    np.testing.assert_allclose(step(m, 3), 6.0)  # Python int
    np.testing.assert_allclose(step(m, np.float32(1.5)), 3.0)  # NumPy scalar
    np.testing.assert_allclose(step(m, x=x), [0.0, 2.0])  # keyword
    out = nnx.jit(lambda m, xs: [m.w[...].sum() * v for v in xs])(m, [x, x])  # a list
    np.testing.assert_allclose(out[1], [0.0, 2.0])
    np.testing.assert_allclose(step(m, jnp.ones(3)), 2.0 * np.ones(3))  # a new shape
    np.testing.assert_allclose(m.count[...], 5)


def test_structure_written_around_setattr_is_seen():
    f = nnx.jit(params_sum)
    m = Counter()
    np.testing.assert_allclose(f(m), 2.0)
    np.testing.assert_allclose(f(m), 2.0)
    vars(m)["extra"] = nnx.Param(jnp.full(3, 2.0))  # no __setattr__
    np.testing.assert_allclose(f(m), 8.0)
    object.__setattr__(m, "w", nnx.Param(jnp.zeros(2)))
    np.testing.assert_allclose(f(m), 6.0)


def test_variable_argument_in_a_node_position():
    @nnx.jit
    def bump(v, x):
        v[...] += x

    v = nnx.Param(jnp.zeros(2))
    for _ in range(3):
        bump(v, 1.0)
    np.testing.assert_allclose(v[...], [3.0, 3.0])
    w = nnx.Param(jnp.ones(2))
    bump(w, 1.0)  # another Variable at the same position
    np.testing.assert_allclose(w[...], [2.0, 2.0])
    np.testing.assert_allclose(v[...], [3.0, 3.0])


def test_a_node_where_an_array_was_and_back():
    @nnx.jit
    def f(a, b):
        first = a.w[...].sum() if isinstance(a, nnx.Module) else a.sum()
        second = b.w[...].sum() if isinstance(b, nnx.Module) else b.sum()
        return first + 10 * second

    m = Counter()
    np.testing.assert_allclose(f(m, jnp.ones(3)), 32.0)
    np.testing.assert_allclose(f(jnp.ones(3), m), 23.0)
    np.testing.assert_allclose(f(m, jnp.ones(3)), 32.0)


def test_tree_mode_still_refuses_shared_references_after_graph_mode_calls():
    m = Counter()
    m.alias = m.w
    np.testing.assert_allclose(step(m, 1.0), 2.0)
    np.testing.assert_allclose(step(m, 1.0), 2.0)
    with nnx.set_graph_mode(False):
        with pytest.raises(ValueError):
            step(m, 1.0)
    np.testing.assert_allclose(step(m, 1.0), 2.0)


def test_the_fast_path_keeps_no_argument_alive():
    f = nnx.jit(params_sum)
    m = Counter()
    f(m)
    f(m)
    ref = weakref.ref(m)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del m
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_a_container_of_objects_where_an_array_was():
    @nnx.jit
    def bump_all(m, extra):
        m.count[...] += 1
        for e in extra if isinstance(extra, list) else ():
            e.count[...] += 1

    m, n = Counter(), Counter()
    bump_all(m, 1.0)
    bump_all(m, 1.0)
    bump_all(m, [n])  # a list holding an object: walked, its update comes back
    np.testing.assert_allclose(n.count[...], 1)
    np.testing.assert_allclose(m.count[...], 3)


def test_graph_updates_mode_changed_between_calls():
    @nnx.jit
    def replace(m, x):
        m.w = nnx.Param(m.w[...] + x)  # a structural change: a new Variable

    m = Counter()
    replace(m, 1.0)
    replace(m, 1.0)
    np.testing.assert_allclose(m.w[...], [3.0, 3.0])
    before = m.w
    with nnx.set_graph_updates(False):
        replace(m, 1.0)  # structural changes stay inside
    assert m.w is before
    replace(m, 1.0)
    assert m.w is not before


# -- the walk cache entry the fast path tries first (``_Fast.entry``, ``_cache.still_kept``) --
class Holder(nnx.Module):
    def __init__(self, child: Counter):
        self.child = child
        self.own = nnx.BatchStat(jnp.asarray(0.0))


@nnx.jit
def bump_both(a, b):
    a.count[...] += 1
    b.own[...] += 1


def test_another_object_beside_the_entry_holder():
    m, h1, h2 = Counter(), Holder(Counter()), Holder(Counter())
    for _ in range(3):
        bump_both(m, h1)
    bump_both(m, h2)  # the first root keeps the entry; the second is another object now
    np.testing.assert_allclose([m.count[...], h1.own[...], h2.own[...]], [4.0, 3.0, 1.0])


def test_the_entry_holder_is_another_object_with_the_same_layout():
    # the holder is the second root (the first is reachable from it): the hint's holder check
    child = Counter()
    h1, h2 = Holder(child), Holder(child)
    for _ in range(3):
        bump_both(child, h1)
    bump_both(child, h2)
    np.testing.assert_allclose([child.count[...], h1.own[...], h2.own[...]], [4.0, 3.0, 1.0])


def test_the_hint_follows_a_new_entry():
    from refax._graph import _cache

    m = Counter()
    step(m, 1.0)
    step(m, 1.0)
    first = step._fast.entry()
    assert first is not None
    _cache.clear(m)  # drops the kept walks: the next walk stores a new entry
    step(m, 1.0)
    step(m, 1.0)
    hint = step._fast.entry()
    assert hint is not None and hint is not first
    assert _cache.still_kept(hint, (m,))
    np.testing.assert_allclose(m.count[...], 4)
    # once the structure changes the entry is dropped, and its weak reference with it
    m.extra = nnx.Param(jnp.ones(1))
    step(m, 1.0)
    gc.collect()
    assert step._fast.entry() is not hint
    np.testing.assert_allclose(m.count[...], 5)
