"""Tests for refax._graph: split/merge/update and friends, GraphDef, filters, the flatten cache."""

import collections
import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refax import errors, nnx

DERANDOMIZED = settings(derandomize=True, max_examples=50, deadline=None)


class Count(nnx.Variable):
    pass


class Linear(nnx.Module):
    def __init__(self, din=2, dout=2, init=jnp.ones):
        self.w = nnx.Param(init((din, dout)))
        self.b = nnx.Param(jnp.zeros(dout))
        self.din = din

    def __call__(self, x):
        return x @ self.w + self.b


class Model(nnx.Module):
    def __init__(self, init=jnp.ones):
        self.lin = Linear(init=init)
        self.layers = [Linear(init=init), Linear(init=init)]
        self.table = {"stat": nnx.BatchStat(jnp.zeros(2)), "tagged": nnx.Param(1.0, tag="t")}
        self.count = Count(jnp.array(0))
        self.arr = jnp.arange(3.0)

    def __call__(self, x):
        self.count[...] += 1
        return self.layers[1](self.layers[0](self.lin(x)))


def flat(state):
    return list(nnx.to_flat_state(state))


def paths(state):
    return {p for p, _ in flat(state)}


# -- split / merge / update / state ----------------------------------------------------
def test_split_merge_roundtrip_reuses_variables():
    m = Model()
    graphdef, state = nnx.split(m)
    assert state["count"] is m.count and state["lin"]["w"] is m.lin.w
    assert state["arr"] is m.arr and state["layers"][1]["b"] is m.layers[1].b
    m2 = nnx.merge(graphdef, state)
    assert type(m2) is Model and m2 is not m and m2.lin is not m.lin
    assert m2.lin.w is m.lin.w and m2.table["stat"] is m.table["stat"]
    assert isinstance(m2.layers, list) and m2.lin.din == 2
    m3 = nnx.merge(graphdef, state, copy=True)
    assert m3.lin.w is not m.lin.w and m3.lin.w.get_metadata() == m.lin.w.get_metadata()
    np.testing.assert_array_equal(m3.lin.w[...], m.lin.w[...])
    assert m3.table["tagged"].tag == "t"
    m2.count[...] += 5  # shared Variable: the original sees it
    assert int(m.count[...]) == 5 and int(m3.count[...]) == 0


def test_state_hands_out_live_variables():
    m = Model()
    s = nnx.state(m)
    s["lin"]["w"][...] = jnp.zeros((2, 2))
    assert float(m.lin.w[...].sum()) == 0.0
    params, counts = nnx.state(m, nnx.Param, Count)
    assert paths(counts) == {("count",)} and ("table", "tagged") in paths(params)
    assert ("arr",) not in paths(params)
    assert nnx.variables(m, Count)["count"] is m.count
    assert nnx.graphdef(m) == nnx.split(m)[0]


def test_update_writes_in_place():
    m = Model()
    w = m.lin.w
    _, state = nnx.split(m)
    new = jax.tree.map(lambda x: x + 10, state)
    nnx.update(m, new)
    assert m.lin.w is w
    np.testing.assert_array_equal(w[...], np.full((2, 2), 11.0))
    np.testing.assert_array_equal(m.arr, [10.0, 11.0, 12.0])  # raw arrays too
    assert int(m.count[...]) == 10
    nnx.update(m, {"count": jnp.array(3)}, nnx.State({"lin": {"b": jnp.ones(2)}}))
    assert int(m.count[...]) == 3 and float(m.lin.b[...].sum()) == 2.0
    with pytest.raises(ValueError, match="lin.extra"):
        nnx.update(m, {"lin": {"extra": jnp.ones(1)}})


def test_spec_functional_loop_under_jit():
    m = Model()
    graphdef, state = nnx.split(m)

    @jax.jit
    def forward(graphdef, state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        _, state = nnx.split(model)
        return y, state

    y, state = forward(graphdef, state, jnp.ones((1, 2)))
    nnx.update(m, state)
    assert int(m.count[...]) == 1
    np.testing.assert_allclose(y, np.full((1, 2), 8.0))


def test_split_tuple_of_nodes_and_graph_mode():
    a, b = Linear(), Linear()
    b.w = a.w
    graphdef, state = nnx.split((a, b))
    assert paths(state) == {(0, "w"), (0, "b"), (1, "b")}
    a2, b2 = nnx.merge(graphdef, state)
    assert a2.w is b2.w is a.w
    nnx.update((a, b), jax.tree.map(lambda x: x * 0, state))
    assert float(b.w[...].sum()) == 0.0
    with pytest.raises(ValueError, match="does not support shared references"):
        nnx.split((a, b), graph=False)
    assert nnx.split((Linear(), Linear()), graph=False)[0] is not None


@jax.tree_util.register_pytree_node_class
class Pair:  # identity-hashed, registered pytree
    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten(self):
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_registered_pytree_attributes_are_walked():
    m = nnx.Module()
    m.pair = Pair(nnx.Param(jnp.ones(2)), jnp.zeros(1))
    m.nt = collections.namedtuple("NT", "x y")(Count(jnp.array(1)), 3)
    graphdef, state = nnx.split(m)
    assert paths(state) == {("pair", 0), ("pair", 1), ("nt", "x")}  # as flax
    assert state["pair"][0] is m.pair.a and state["nt"]["x"] is m.nt.x
    m2 = nnx.merge(graphdef, state)
    assert type(m2.pair) is Pair and m2.pair is not m.pair and m2.pair.a is m.pair.a
    assert type(m2.nt).__name__ == "NT" and m2.nt.y == 3


def test_shared_references_and_cycles_survive():
    m = Model()
    m.alias = m.layers[0]
    m.me = m
    m.layers[1].parent = m
    m.table["again"] = m.count
    for m2 in (nnx.merge(*nnx.split(m)), nnx.clone(m), copy.deepcopy(m)):
        assert m2.alias is m2.layers[0] and m2.me is m2 and m2.layers[1].parent is m2
        assert m2.table["again"] is m2.count
        assert nnx.find_duplicates(m2) == nnx.find_duplicates(m)
        assert nnx.graphdef(m2) == nnx.graphdef(m)
    assert sorted(nnx.find_duplicates(m)) == [
        [(), ("layers", 1, "parent"), ("me",)],
        [("alias",), ("layers", 0)],
        [("count",), ("table", "again")],
    ]


def test_clone_copies_objects_and_optionally_buffers():
    m = Model()
    c = nnx.clone(m)
    assert c.lin.w is not m.lin.w and c.lin.w[...] is m.lin.w[...]
    c.lin.w[...] = jnp.zeros((2, 2))
    assert float(m.lin.w[...].sum()) == 4.0
    d = nnx.clone(m, arrays=True)
    assert d.lin.w[...] is not m.lin.w[...]
    np.testing.assert_array_equal(d.lin.w[...], m.lin.w[...])
    assert d.arr is not m.arr


def test_pop():
    m = Model()
    m.sow(nnx.Intermediate, "seen", 1.0)
    m.layers[0].sow(nnx.Intermediate, "h", 2.0)
    inter = nnx.pop(m, nnx.Intermediate)
    assert paths(inter) == {("seen",), ("layers", 0, "h")}
    assert not hasattr(m, "seen") and not hasattr(m.layers[0], "h")
    counts, stats = nnx.pop(m, Count, nnx.BatchStat)
    assert paths(counts) == {("count",)} and paths(stats) == {("table", "stat")}
    assert paths(nnx.state(m, Count)) == set()
    assert "stat" not in m.table


# -- iteration & functional helpers --------------------------------------------------------
def test_iter_graph_and_find_duplicates():
    m = Linear()
    m.shared = m.w
    items = list(nnx.iter_graph(m))
    assert [p for p, _ in items] == [("b",), ("din",), ("shared",), ()]
    assert items[-1][1] is m and items[2][1] is m.w
    assert nnx.find_duplicates(m) == [[("shared",), ("w",)]]
    assert nnx.find_duplicates(Linear()) == []


def test_map_and_recursive_map():
    m = Linear()
    m2 = nnx.map(lambda path, v: v * 2 if path == ("w",) else v, m)
    assert type(m2) is Linear and m2 is not m and type(m2.w) is nnx.Param
    np.testing.assert_array_equal(m2.w[...], np.full((2, 2), 2.0))
    np.testing.assert_array_equal(m.w[...], np.ones((2, 2)))

    seen = []

    def f(path, node):
        seen.append(path)
        return nnx.Param(node[...] * 3) if isinstance(node, nnx.Param) else node

    m.alias = m.w
    r = nnx.recursive_map(f, m)
    assert seen[-1] == () and r.alias is r.w
    np.testing.assert_array_equal(r.w[...], np.full((2, 2), 3.0))
    assert type(r) is Linear and r.din == 2


def test_recursive_map_leaves_input_untouched():
    m = Linear()
    w = m.w
    r = nnx.recursive_map(lambda p, n: nnx.Param(n[...] + 1) if p == ("w",) else n, m)
    assert r is not m and m.w is w


def test_recursive_map_cycle_clear_error():
    m = Linear()
    m.me = m
    with pytest.raises(ValueError, match="cycle"):
        nnx.recursive_map(lambda p, n: n, m)


def test_call_and_graphdef_apply():
    m = Model()
    graphdef, state = nnx.split(m)
    state = jax.tree.map(jnp.copy, state)  # detach from m
    y, (g2, s2) = nnx.call((graphdef, state))(jnp.ones((1, 2)))
    assert g2 == graphdef and int(s2["count"][...]) == 1 and int(m.count[...]) == 0
    np.testing.assert_allclose(y, np.full((1, 2), 8.0))
    y2, _ = nnx.call((graphdef, state)).lin(jnp.ones((1, 2)))
    np.testing.assert_allclose(y2, np.full((1, 2), 2.0))
    y3, (_, s3) = graphdef.apply(state)(jnp.ones((1, 2)))
    np.testing.assert_allclose(y3, y)


def test_unpack_and_graph_state():
    m = Model()
    params, rest = nnx.unpack(m, nnx.Param, ...)
    assert isinstance(params, nnx.GraphState) and params.graphdef == nnx.graphdef(m)
    assert params["lin"]["w"] is m.lin.w and "lin" in params and len(rest) == 3
    m2 = nnx.merge(params, rest)
    assert m2.lin.w is m.lin.w and m2.count is m.count
    nnx.update(m, params)


def test_unpack_single_graph_state():
    m = Model()
    gs = nnx.unpack(m)
    assert isinstance(gs, nnx.GraphState)
    assert nnx.merge(gs).count is m.count


def test_graph_state_is_pytree_mapping():
    gs = nnx.unpack(Linear(), ...)
    out = jax.jit(lambda g: g)(gs)
    assert out.graphdef == gs.graphdef
    gs["b"] = nnx.Param(jnp.ones(2))


# -- GraphDef --------------------------------------------------------------------------------
def test_graphdef_equality_and_hash():
    g1, g2 = nnx.graphdef(Model(jnp.ones)), nnx.graphdef(Model(jnp.zeros))
    assert g1 == g2 and hash(g1) == hash(g2) and g1 is not g2
    assert len({g1, g2}) == 1
    assert pickle.loads(pickle.dumps(g1)) == g1
    different = []
    for change in [
        lambda m: setattr(m.lin, "din", 3),  # static attribute
        lambda m: setattr(m, "extra", nnx.Param(1.0)),  # new attribute
        lambda m: setattr(m.lin, "w", nnx.BatchStat(m.lin.w[...])),  # Variable type
        lambda m: m.lin.w.set_metadata(tag="x"),  # Variable metadata
        lambda m: m.layers.append(Linear()),  # container length
        lambda m: setattr(m, "alias", m.lin),  # sharing
    ]:
        m = Model()
        change(m)
        different.append(nnx.graphdef(m))
    assert all(g != g1 for g in different)
    m = Model()
    m.lin.w[...] = jnp.full((2, 2), 7.0)  # values only
    m.arr = jnp.zeros(3)
    assert nnx.graphdef(m) == g1


def test_graphdef_values_do_not_retrace():
    traces = []

    @jax.jit
    def f(graphdef, state):
        traces.append(1)
        return nnx.merge(graphdef, state).lin.w[...].sum()

    assert float(f(*nnx.split(Model(jnp.ones)))) == 4.0
    assert float(f(*nnx.split(Model(jnp.zeros)))) == 0.0
    assert len(traces) == 1
    m = Model()
    m.lin.din = 5
    f(*nnx.split(m))
    assert len(traces) == 2


def test_graphdef_independent_of_assignment_order():
    a, b = nnx.Module(), nnx.Module()
    a.x, a.y = nnx.Param(1.0), nnx.Param(2.0)
    b.y, b.x = nnx.Param(2.0), nnx.Param(1.0)
    assert nnx.graphdef(a) == nnx.graphdef(b)
    c = nnx.Module()
    c.b = Linear()
    c.a = c.b
    assert paths(nnx.state(c)) == {("a", "w"), ("a", "b")}  # flax: first in sorted order


# -- filters ---------------------------------------------------------------------------------
FILTER_CASES = [
    ((nnx.Param, ...), "lin/w lin/b tagged"),
    (((nnx.BatchStat, Count), ...), "stat count"),
    (("t", ...), "tagged"),
    ((lambda p, v: p[-1] == "b", ...), "lin/b"),
    ((nnx.PathContains("lin"), True), "lin/w lin/b"),
    ((nnx.Not(nnx.Param), nnx.Everything()), "stat count arr"),
    ((nnx.All(nnx.Param, nnx.Not("t")), nnx.Any(nnx.Param, nnx.Everything())), "lin/w lin/b"),
    ((None, nnx.Nothing(), False, ...), ""),
    pytest.param(([nnx.Param, nnx.BatchStat], ...), "lin/w lin/b tagged stat"),
]


@pytest.mark.parametrize("filters,first", FILTER_CASES)
def test_filter_literals_in_split(filters, first):
    m = nnx.Module()
    m.lin = Linear()
    m.tagged = nnx.Param(1.0, tag="t")
    m.stat = nnx.BatchStat(jnp.zeros(1))
    m.count = Count(jnp.array(0))
    m.arr = jnp.ones(1)
    everything = {"lin/w", "lin/b", "tagged", "stat", "count", "arr"}
    first = set(first.split())
    for _ in range(3):  # later splits may come from the cache
        graphdef, *states = nnx.split(m, *filters)
        got = [{"/".join(p) for p in paths(s)} for s in states]
        assert got == [first] + [set()] * (len(filters) - 2) + [everything - first]
        assert nnx.merge(graphdef, *states).lin.w is m.lin.w


def test_non_exhaustive_split_raises():
    m = Model()
    with pytest.raises(ValueError) as info:
        nnx.split(m, nnx.Param)
    msg = str(info.value)
    assert msg.startswith("Non-exhaustive filters, got a non-empty remainder")
    assert "count" in msg and "table.stat" in msg


class Unhashable:
    __hash__ = None

    def __eq__(self, other):
        return self is other


def test_unhashable_static_attribute_names_path():
    m = Model()
    m.layers[1].cfg = Unhashable()
    with pytest.raises(TypeError, match=r"layers\.1\.cfg"):
        nnx.split(m)
    del m.layers[1].cfg
    m.options = {"inner": [Unhashable()]}
    with pytest.raises(TypeError, match=r"options\.inner\.0"):
        nnx.graphdef(m)


@pytest.mark.parametrize(
    "edit,path",
    [
        (lambda s: s["lin"].raw_mapping.pop("w"), "lin.w"),
        (lambda s: s["lin"].__setitem__("extra", nnx.Param(1.0)), "lin.extra"),
        (lambda s: s["layers"].__setitem__(5, {"w": nnx.Param(1.0)}), "layers.5"),
        (lambda s: s.raw_mapping.pop("arr"), "arr"),
    ],
)
def test_merge_state_that_does_not_fit(edit, path):
    graphdef, state = nnx.split(Model())
    edit(state)
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        nnx.merge(graphdef, state)
    graphdef, params, _ = nnx.split(Model(), nnx.Param, ...)
    with pytest.raises(ValueError, match=r"arr|count|table\.stat"):
        nnx.merge(graphdef, params)


# -- property tests over random graphs -------------------------------------------------------
class Node(nnx.Module):
    pass


VAR_TYPES = [nnx.Param, nnx.BatchStat, Count]


@st.composite
def module_graphs(draw):
    n = draw(st.integers(1, 5))
    mods = [Node() for _ in range(n)]
    slots = [{"attrs": {}, "list": [], "dict": {}, "tuple": []} for _ in range(n)]

    def attach(parent, child):
        s = slots[parent]
        kind = draw(st.sampled_from(["attr", "list", "dict", "tuple"]))
        if kind == "attr":
            s["attrs"][f"a{len(s['attrs'])}"] = child
        elif kind == "dict":
            s["dict"][f"k{len(s['dict'])}"] = child
        else:
            s[kind].append(child)

    for i in range(1, n):
        attach(draw(st.integers(0, i - 1)), mods[i])
    variables = []
    for i in range(draw(st.integers(0, 6))):
        cls = draw(st.sampled_from(VAR_TYPES))
        shape = draw(st.sampled_from([(), (2,), (2, 3)]))
        variables.append(cls(jnp.full(shape, float(i))))
        attach(draw(st.integers(0, n - 1)), variables[-1])
    pool = mods + variables
    for _ in range(draw(st.integers(0, 3))):  # sharing, and cycles when a module is picked
        attach(draw(st.integers(0, n - 1)), pool[draw(st.integers(0, len(pool) - 1))])
    for m, s in zip(mods, slots):
        for k, v in s["attrs"].items():
            setattr(m, k, v)
        if s["list"]:
            m.items = s["list"]
        if s["dict"]:
            m.table = s["dict"]
        if s["tuple"]:
            m.pair = tuple(s["tuple"])
        if draw(st.booleans()):
            m.size = draw(st.integers(0, 3))
        if draw(st.booleans()):
            m.label = draw(st.sampled_from(["x", "y"]))
        if draw(st.booleans()):
            m.raw = jnp.arange(2.0)
    return mods[0]


def assert_same_graph(a, b, *, same_variables):
    assert nnx.graphdef(a) == nnx.graphdef(b)
    assert nnx.find_duplicates(a) == nnx.find_duplicates(b)
    fa, fb = flat(nnx.state(a)), flat(nnx.state(b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (_, x), (_, y) in zip(fa, fb):
        assert type(x) is type(y)
        if isinstance(x, nnx.Variable):
            assert (x is y) == same_variables
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@DERANDOMIZED
@given(module_graphs())
def test_property_split_merge_roundtrip(m):
    assert_same_graph(m, nnx.merge(*nnx.split(m)), same_variables=True)
    assert_same_graph(m, nnx.merge(*nnx.split(m), copy=True), same_variables=False)


@DERANDOMIZED
@given(module_graphs())
def test_property_filters_partition_exhaustively(m):
    full = flat(nnx.state(m))
    graphdef, params, stats, rest = nnx.split(m, nnx.Param, nnx.BatchStat, ...)
    parts = [flat(s) for s in (params, stats, rest)]
    assert all(isinstance(v, nnx.Param) for _, v in parts[0])
    assert all(isinstance(v, nnx.BatchStat) for _, v in parts[1])
    assert not any(isinstance(v, nnx.Param | nnx.BatchStat) for _, v in parts[2])
    union = sorted((p for part in parts for p, _ in part), key=repr)
    assert union == sorted((p for p, _ in full), key=repr)  # every leaf exactly once
    leaves = {id(v) for part in parts for _, v in part}
    assert leaves == {id(v) for _, v in full}
    assert_same_graph(m, nnx.merge(graphdef, params, stats, rest), same_variables=True)


@DERANDOMIZED
@given(module_graphs())
def test_property_clone_and_pickle_preserve_sharing(m):
    assert_same_graph(m, nnx.clone(m), same_variables=False)
    assert_same_graph(m, pickle.loads(pickle.dumps(m)), same_variables=False)
    assert_same_graph(m, copy.deepcopy(m), same_variables=False)


# -- oracle ----------------------------------------------------------------------------------
def test_oracle_graph_helpers_match_flax():
    flax_nnx = pytest.importorskip("flax.nnx")

    def build(lib):
        class Lin(lib.Module):
            def __init__(self):
                self.w = lib.Param(jnp.ones(2))
                self.s = lib.BatchStat(jnp.zeros(1))

        class M(lib.Module):
            def __init__(self):
                self.a = Lin()
                self.layers = lib.data([self.a, Lin()])
                self.d = lib.data({"x": self.a.w, "y": self})
                self.me = self

        return M()

    ours, theirs = build(nnx), build(flax_nnx)
    assert nnx.find_duplicates(ours) == flax_nnx.find_duplicates(theirs)
    ours_iter = [p for p, _ in nnx.iter_graph(ours)]
    theirs_iter = [p for p, _ in flax_nnx.iter_graph(theirs)]
    assert ours_iter == [p for p in theirs_iter if not str(p[-1:]).startswith("('_pytree")]
    for f in [(), (nnx.Param, ...)]:
        ff = [flax_nnx.Param, ...] if f else []
        ours_paths = [paths(s) for s in nnx.split(ours, *f)[1:]]
        assert ours_paths == [
            {p for p, _ in flax_nnx.to_flat_state(s)} for s in flax_nnx.split(theirs, *ff)[1:]
        ]
    assert isinstance(errors.GraphStructureError("x"), ValueError)
