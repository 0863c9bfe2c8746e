"""The building blocks for hand-written transforms: shared numbering across walks
(flatten/unflatten with RefMap/IndexMap), split/merge/update contexts, to_tree/from_tree,
prefix, and the graph-level API details they rely on (GraphState, bare leaves, tree mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


class Pair(nnx.Module):
    def __init__(self, a, b):
        self.a = nnx.Param(jnp.asarray(a))
        self.b = nnx.BatchStat(jnp.asarray(b))


def test_refmap_is_keyed_by_identity_and_indexmap_inverts_it():
    x, y = [1], [1]  # equal, unhashable: RefMap keys by identity
    refs = nnx.graphlib.RefMap()
    refs[x], refs[y] = 0, 1
    assert len(refs) == 2 and refs[x] == 0 and refs[y] == 1 and x in refs
    index = nnx.graphlib.IndexMap.from_refmap(refs)
    assert index[0] is x and index[1] is y
    back = nnx.graphlib.RefMap.from_indexmap(index)
    assert back[y] == 1
    del refs[x]
    assert x not in refs and list(refs) == [y]


def test_flatten_shares_one_numbering_across_walks():
    m = Pair(1.0, 2.0)
    refs = nnx.graphlib.RefMap()
    g1, s1 = nnx.graphlib.flatten(m, ref_index=refs)
    g2, s2 = nnx.graphlib.flatten({"again": m}, ref_index=refs)
    assert len(s1) == 2 and len(s2) == 0  # the second walk only refers to m
    assert isinstance(g1.nodes[0], nnx.graphlib.NodeDef)
    assert isinstance(g2.nodes[1], nnx.graphlib.NodeRef)
    index = nnx.graphlib.IndexMap()
    m1 = nnx.graphlib.unflatten(g1, s1, index_ref=index)
    d = nnx.graphlib.unflatten(g2, s2, index_ref=index)
    assert d["again"] is m1
    np.testing.assert_allclose(m1.a[...], 1.0)


def test_unflatten_rejects_a_wrong_number_of_leaves():
    graphdef, leaves = nnx.graphlib.flatten(Pair(1.0, 2.0), with_paths=False)
    with pytest.raises(ValueError, match="Incorrect number of leaves"):
        nnx.graphlib.unflatten(graphdef, leaves[:1])


def test_bare_leaves_split_and_merge():
    v = nnx.Param(jnp.array(3.0))
    graphdef, state = nnx.split(v)
    assert state is v  # the state of a bare Variable is the Variable, as for an object's
    w = nnx.merge(graphdef, nnx.Param(jnp.array(4.0)))
    assert isinstance(w, nnx.Param)
    np.testing.assert_allclose(w[...], 4.0)
    graphdef, leaves = nnx.graphlib.flatten(jnp.ones(2), with_paths=False)
    np.testing.assert_allclose(nnx.graphlib.unflatten(graphdef, leaves), jnp.ones(2))


def test_contexts_merge_two_splits_of_one_object_into_one_object():
    m = Pair(1.0, 2.0)
    with nnx.graphlib.split_context() as ctx:
        g1, s1 = ctx.split(m)
        g2, s2 = ctx.split(m)
    assert len(nnx.to_flat_state(s2)) == 0
    with nnx.graphlib.merge_context() as ctx:
        m1 = ctx.merge(g1, s1)
        m2 = ctx.merge(g2, s2)
    assert m1 is m2 and m1 is not m


def test_update_context_propagates_changes_out_of_a_jax_transform():
    m = Pair(1.0, 2.0)
    with nnx.update_context("t"):
        with nnx.graphlib.split_context("t") as ctx:
            g, s = ctx.split(m)

        @jax.jit
        def f(g, s):
            with nnx.graphlib.merge_context("t", True) as ctx:
                inner = ctx.merge(g, s)
            inner.a[...] = inner.a[...] * 10
            inner.c = nnx.Param(jnp.array(5.0))  # a structure change
            with nnx.graphlib.split_context("t") as ctx:
                return ctx.split(inner)

        g_out, s_out = f(g, s)
        with nnx.graphlib.merge_context("t", False) as ctx:
            out = ctx.merge(g_out, s_out)
    assert out is m  # the outer object, updated in place
    np.testing.assert_allclose(m.a[...], 10.0)
    np.testing.assert_allclose(m.c[...], 5.0)


def test_current_update_context_requires_an_open_context():
    with pytest.raises(ValueError):
        nnx.graphlib.current_update_context("nowhere")
    with nnx.update_context("here") as ctx:
        assert nnx.graphlib.current_update_context("here") is ctx


def test_to_tree_splits_shared_objects_once_and_from_tree_restores_sharing():
    m = Pair(1.0, 2.0)
    pure = nnx.to_tree((m, 1, {"b": m}))
    assert pure[1] == 1
    assert isinstance(pure[0], nnx.NodeStates) and isinstance(pure[2]["b"], nnx.NodeStates)
    assert len(nnx.to_flat_state(pure[0].states[0])) == 2
    assert len(nnx.to_flat_state(pure[2]["b"].states[0])) == 0
    # the pure tree is a pytree: JAX transforms it, here doubling every leaf
    doubled = jax.tree.map(lambda x: x * 2, pure)
    a, one, d = nnx.from_tree(doubled)
    assert d["b"] is a and one == 2
    np.testing.assert_allclose(a.a[...], 2.0)
    np.testing.assert_allclose(a.b[...], 4.0)


def test_to_tree_checks_the_prefixes_of_aliased_objects():
    m = Pair(1.0, 2.0)
    nnx.to_tree((m, m), prefix=(0, 0))
    with pytest.raises(ValueError, match="Inconsistent aliasing detected"):
        nnx.to_tree((m, m), prefix=(0, 1))


def test_clear_non_graph_nodes():
    m = Pair(1.0, 2.0)
    assert nnx.extract.clear_non_graph_nodes((m, 3, [jnp.ones(1)])) == (m, None, [None])


def test_prefix_tree_mode_has_the_objects_shape():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    axes = nnx.prefix(bn, {nnx.Param: None, nnx.BatchStat: 0}, graph=False)
    assert type(axes) is nnx.BatchNorm
    assert (axes.scale, axes.bias, axes.mean, axes.var) == (None, None, 0, 0)


def test_prefix_graph_mode_is_a_tree_state():
    m = Pair(1.0, 2.0)
    axes = nnx.prefix(m, {nnx.Param: "p", nnx.BatchStat: "s"}, graph=True)
    assert isinstance(axes, nnx.extract.TreeState)
    assert axes.state["a"] == "p" and axes.state["b"] == "s"


def test_prefix_without_a_matching_filter_names_the_leaf():
    with pytest.raises(ValueError, match="No filter matched"):
        nnx.prefix(Pair(1.0, 2.0), {nnx.Param: 0}, graph=False)


def test_prefix_callable():
    axes = nnx.prefix(Pair(1.0, 2.0), lambda path, leaf: path[-1], graph=False)
    assert (axes.a, axes.b) == ("a", "b")


@pytest.mark.parametrize("graph", [True, False])
def test_prefix_as_vmap_in_axes(graph):
    m = Pair(jnp.arange(4.0), 10.0)
    axes = nnx.prefix(m, {nnx.Param: 0, nnx.BatchStat: None}, graph=graph)

    @nnx.vmap(in_axes=(axes,), out_axes=0, graph=graph, graph_updates=False)
    def f(m):
        return m.a[...] + m.b[...]

    np.testing.assert_allclose(f(m), jnp.arange(4.0) + 10.0)


def test_tree_mode_prefix_works_with_plain_jax_vmap():
    m = Pair(jnp.arange(4.0), 10.0)
    axes = nnx.prefix(m, {nnx.Param: 0, nnx.BatchStat: None}, graph=False)
    out = jax.vmap(lambda m: m.a[...] * m.b[...], in_axes=(axes,))(m)
    np.testing.assert_allclose(out, jnp.arange(4.0) * 10.0)


def test_tree_map_to_non_arrays_keeps_the_object_structure():
    m = Pair(1.0, 2.0)
    zeros = jax.tree.map(lambda _: 0, m)
    assert jax.tree.structure(zeros) == jax.tree.structure(m)


def test_prefix_of_aliased_variables_with_different_axes_is_rejected():
    v = nnx.Param(jnp.ones((4, 2)))

    class Holder(nnx.Module):
        def __init__(self, x):
            self.x = x

    h1, h2 = Holder(v), Holder(v)
    a1, a2 = nnx.prefix((h1, h2), lambda path, leaf: 0, graph=True)

    @nnx.vmap(in_axes=(a1, a2), graph=True, graph_updates=False)
    def same(h1, h2):
        return h1.x[...].sum()

    assert same(h1, h2).shape == (4,)
    b1, b2 = nnx.prefix((h1, h2), lambda path, leaf: 0, graph=True)
    b2 = b2.replace(prefix_fn=lambda path, leaf: 1)

    @nnx.vmap(in_axes=(b1, b2), graph=True, graph_updates=False)
    def differ(h1, h2):
        return h1.x[...].sum()

    with pytest.raises(ValueError, match="Inconsistent aliasing detected"):
        differ(h1, h2)


def test_graph_state_merges_alone_and_checks_its_arguments():
    m = Pair(1.0, 2.0)
    params, stats = nnx.unpack(m, nnx.Param, nnx.BatchStat)
    assert isinstance(params, nnx.GraphState)
    rebuilt = nnx.merge(params, stats)
    np.testing.assert_allclose(rebuilt.b[...], 2.0)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'state'"):
        nnx.merge(nnx.graphdef(m))
    other = nnx.unpack(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="GraphDef must be the same"):
        nnx.merge(params, other)


def test_tree_mode_rejects_shared_objects_and_names_the_paths():
    v = nnx.Param(jnp.ones(1))
    with pytest.raises(ValueError, match="found at paths"):
        nnx.split({"x": v, "y": v}, graph=False)
    nnx.split({"x": v, "y": v}, graph=True)  # graph mode keeps the sharing


def test_update_of_a_bare_variable():
    v = nnx.Param(jnp.array(1.0))
    nnx.update(v, nnx.state(nnx.Param(jnp.array(7.0))))
    np.testing.assert_allclose(v[...], 7.0)


def test_clone_without_copying_variables_shares_them():
    m = Pair(1.0, 2.0)
    shallow = nnx.clone(m, variables=False)
    deep = nnx.clone(m)
    assert shallow is not m and shallow.a is m.a
    assert deep.a is not m.a


def test_find_duplicates_only_reports_the_filtered_kinds():
    v = nnx.Param(jnp.ones(1))
    s = nnx.BatchStat(jnp.ones(1))
    tree = {"p1": v, "p2": v, "s1": s, "s2": s}
    assert len(nnx.find_duplicates(tree)) == 2
    only = nnx.find_duplicates(tree, only=nnx.Param)
    assert [sorted(paths) for paths in only] == [[("p1",), ("p2",)]]


def test_private_pytree_helpers_round_trip():
    from refax.nnx import graphlib

    leaves, treedef = graphlib._flatten_pytree({"a": 1, "b": (2, 3)})
    assert dict(leaves)["a"] == 1
    assert graphlib._unflatten_pytree(leaves, treedef) == {"a": 1, "b": (2, 3)}
