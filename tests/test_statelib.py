"""Tests for refax._statelib: State, FlatState and the state functions."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refax._filters import PathContains
from refax._statelib import (
    FlatState,
    MissingPathError,
    State,
    diff,
    filter_state,
    from_flat_state,
    map_state,
    merge_state,
    replace_by_pure_dict,
    restore_int_paths,
    split_state,
    to_flat_state,
    to_pure_dict,
)
from refax._variables import BatchStat, Cache, Param, Variable


def make_state() -> State:
    return State(
        {
            "linear": {"kernel": Param(jnp.ones((2, 3))), "bias": Param(jnp.zeros(3))},
            "bn": {"mean": BatchStat(jnp.zeros(3)), "var": BatchStat(jnp.ones(3))},
            "layers": {0: {"w": Param(jnp.full(2, 2.0))}, 1: {"w": Param(jnp.full(2, 3.0))}},
            "count": jnp.array(5),
        }
    )


# -- construction and mapping protocol ---------------------------------------------------------
def test_constructor_copies_top_level_only():
    inner = {"b": Param(1.0)}
    d = {"a": inner}
    s = State(d)
    assert s.raw_mapping is not d
    assert s.raw_mapping["a"] is inner
    s["new"] = 1
    assert "new" not in d


def test_constructor_unwraps_nested_states_and_mappings():
    sub = State({"w": Param(1.0)})
    s = State({"sub": sub, "deep": {"x": State({"y": 2})}, "pairs": dict([("k", 3)])})
    assert type(s.raw_mapping["sub"]) is dict
    assert s.raw_mapping["sub"] is sub.raw_mapping
    assert type(s.raw_mapping["deep"]["x"]) is dict
    assert State([("a", 1), ("b", {"c": 2})]).to_pure_dict() == {"a": 1, "b": {"c": 2}}
    assert State(s) == s and State(s).raw_mapping is not s.raw_mapping
    assert len(State()) == 0


def test_from_dict_unsafe_shares():
    d = {"a": {"b": 1}}
    s = State._from_dict_unsafe(d)
    assert s.raw_mapping is d


def test_views_write_through():
    s = make_state()
    view = s["linear"]
    assert isinstance(view, State)
    assert view.raw_mapping is s.raw_mapping["linear"]
    view["extra"] = Param(7.0)
    assert s.linear.extra.get_value() == 7.0
    s.layers[0].w = Param(jnp.zeros(2))
    assert float(s["layers"][0]["w"].sum()) == 0.0
    s.linear.kernel[...] = jnp.full((2, 3), 4.0)
    assert float(s.raw_mapping["linear"]["kernel"].get_value()[0, 0]) == 4.0


def test_setattr_setitem_delitem():
    s = State({})
    s.a = {"b": 1}
    s["c"] = State({"d": 2})
    assert type(s.raw_mapping["a"]) is dict and type(s.raw_mapping["c"]) is dict
    assert s.c.d == 2
    del s["a"]
    del s.c
    assert len(s) == 0
    with pytest.raises(AttributeError, match="no key 'missing'"):
        s.missing  # noqa: B018
    with pytest.raises(AttributeError):
        del s.missing
    with pytest.raises(KeyError):
        s["missing"]


def test_iteration_and_views():
    s = make_state()
    assert list(s) == ["linear", "bn", "layers", "count"]
    assert len(s) == 4 and "bn" in s and "nope" not in s
    assert list(s.keys()) == list(s)
    values = list(s.values())
    assert isinstance(values[0], State) and values[0].raw_mapping is s.raw_mapping["linear"]
    items = dict(s.items())
    assert isinstance(items["layers"], State) and 0 in items["layers"]
    assert s.get("nope", 3) == 3 and isinstance(s.get("bn"), State)
    assert "linear" in dir(s)


def test_equality():
    s = make_state()
    assert s == make_state()
    assert s == s.raw_mapping
    other = make_state()
    other.linear.bias = Param(jnp.ones(3))
    assert s != other
    other = make_state()
    other.linear.bias = BatchStat(jnp.zeros(3))  # same value, different type
    assert s != other
    other = make_state()
    other.linear.bias = Param(jnp.zeros(3), tag="x")  # different metadata
    assert s != other
    other = make_state()
    del other.bn.var
    assert s != other
    assert State({"a": {"b": 1}}) != State({"a": 1})
    assert State({"a": np.ones(2)}) == State({"a": np.ones(2)})
    assert (State({}) == 3) is False


def test_or_and_sub():
    a = State({"x": {"p": 1, "q": 2}})
    b = State({"x": {"q": 20, "r": 30}, "y": 4})
    assert (a | b).to_pure_dict() == {"x": {"p": 1, "q": 20, "r": 30}, "y": 4}
    assert (a | State({})) is a
    assert ({"z": 0} | a).to_pure_dict() == {"z": 0, "x": {"p": 1, "q": 2}}
    assert (b - a).to_pure_dict() == {"x": {"r": 30}, "y": 4}
    assert diff(a, State({})) is a
    assert diff(a, a) == State({})


def test_repr_format():
    s = State({"w": Param(jnp.zeros(2)), "n": {0: 1, "e": {}}})
    expected = (
        "State({\n"
        "  'w': Param( # 2 (8 B)\n"
        "    value=Array([0., 0.], dtype=float32)\n"
        "  ),\n"
        "  'n': {\n"
        "    0: 1,\n"
        "    'e': {}\n"
        "  }\n"
        "})"
    )
    assert repr(s) == expected
    assert repr(State({})) == "State({})"
    assert repr(FlatState([])) == "FlatState([])"
    assert repr(State({"a": 1}).flat_state()) == "FlatState([\n  (('a',), 1)\n])"


def test_pickle_and_copy():
    s = make_state()
    assert pickle.loads(pickle.dumps(s)) == s
    deep = copy.deepcopy(s)
    assert deep == s and deep.linear.kernel is not s.linear.kernel
    shallow = copy.copy(s)
    assert shallow.raw_mapping is not s.raw_mapping
    assert shallow.raw_mapping["linear"] is s.raw_mapping["linear"]


# -- pytree ----------------------------------------------------------------------------------------
def test_pytree_structure_and_key_paths():
    s = make_state()
    treedef = jax.tree_util.tree_structure(s)
    assert treedef.num_leaves == 7
    # one State node on top; the nested levels are plain dicts that JAX flattens natively
    assert treedef.node_data() == (State, ("bn", "count", "layers", "linear"))
    assert [c.node_data()[0] if c.node_data() else None for c in treedef.children()] == [
        dict,
        None,
        dict,
        dict,
    ]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(s)[0]]
    as_dict = jax.tree_util.tree_flatten_with_path(to_pure_dict(s))[0]
    assert [p[:-1] if p[-1] == jax.tree_util.GetAttrKey("value") else p for p in paths] == [
        p for p, _ in as_dict
    ]
    assert jax.tree_util.keystr(paths[0]) == "['bn']['mean'].value"
    leaves, treedef = jax.tree.flatten(s)
    again = jax.tree.unflatten(treedef, leaves)
    assert type(again) is State and again == s


def test_jit_accepts_and_returns_state():
    s = make_state()

    @jax.jit
    def double(state):
        assert isinstance(state, State)
        return jax.tree.map(lambda x: x * 2, state)

    out = double(s)
    assert type(out) is State and type(out.linear.kernel) is Param
    np.testing.assert_allclose(out.layers[1].w.get_value(), 6.0)
    assert int(out.count) == 10
    grads = jax.grad(lambda st: st.linear.kernel.get_value().sum())(s.filter(Param))
    assert type(grads) is State
    np.testing.assert_allclose(grads.linear.kernel.get_value(), 1.0)


def test_subclass_is_a_pytree():
    class MyState(State):
        pass

    s = MyState({"a": {"b": Param(1.0)}})
    assert type(s.a) is MyState
    out = jax.tree.map(lambda x: x + 1, s)
    assert type(out) is MyState and out.a.b.get_value() == 2.0


# -- flat state ------------------------------------------------------------------------------------
def test_flat_state_sorted_and_sequence():
    s = make_state()
    flat = s.flat_state()
    assert flat.paths == tuple(sorted(flat.paths))
    assert flat.paths[0] == ("bn", "mean") and ("layers", 1, "w") in flat.paths
    assert len(flat) == 7 and len(flat.leaves) == 7
    assert flat[0] == (("bn", "mean"), s.bn.mean)
    assert isinstance(flat[1:3], FlatState) and len(flat[1:3]) == 2
    assert list(flat) == list(zip(flat.paths, flat.leaves))
    assert to_flat_state(s) == flat
    unsorted = FlatState([(("b",), 1), (("a", "z"), 2), (("a", "y"), 3)])
    assert unsorted.paths == (("a", "y"), ("a", "z"), ("b",))
    mixed = FlatState([(("a", 1), 1), (("a", "x"), 2)])
    assert len(mixed) == 2


def test_flat_state_filter_split_merge():
    flat = make_state().flat_state()
    params = flat.filter(Param)
    assert all(isinstance(v, Param) for v in params.leaves) and len(params) == 4
    p, b = flat.filter(Param, BatchStat)
    assert len(p) + len(b) == 6
    with pytest.raises(ValueError, match="^Non-exhaustive filters"):
        flat.split(Param, BatchStat)
    p, b, rest = flat.split(Param, BatchStat, ...)
    assert rest.paths == (("count",),)
    merged = FlatState.merge(p, b, rest)
    assert merged == flat
    assert p.merge(b, rest) == flat
    assert merged.to_nested_state() == make_state()
    fs = FlatState.from_sorted_keys_values(flat.paths, flat.leaves)
    assert fs == flat
    leaves, treedef = jax.tree.flatten(flat)
    assert len(leaves) == 7 and jax.tree.unflatten(treedef, leaves) == flat


def test_from_flat_path():
    expected = State({"a": {"b": 1, 0: {"c": 2}}, "d": 3})
    pairs = [(("a", "b"), 1), (("a", 0, "c"), 2), (("d",), 3)]
    assert State.from_flat_path(dict(pairs)) == expected
    assert State.from_flat_state(pairs) == expected
    assert from_flat_state(pairs) == expected
    assert from_flat_state(to_flat_state(expected)) == expected
    with pytest.raises(ValueError, match="empty path"):
        from_flat_state([((), 1)])


# -- filter / split / merge / map ---------------------------------------------------------------
def test_filter_and_split():
    s = make_state()
    params = s.filter(Param)
    assert isinstance(params, State)
    assert set(params) == {"linear", "layers"} and "bn" not in params
    assert params.linear.kernel is s.linear.kernel  # leaves are shared, not copied
    p, b = s.filter(Param, BatchStat)
    assert set(b.bn) == {"mean", "var"}
    kernels, rest = s.split(PathContains("kernel"), ...)
    assert to_flat_state(kernels).paths == (("linear", "kernel"),)
    assert len(to_flat_state(rest)) == 6
    # the first matching filter wins
    a, b = s.split(Variable, ...)
    assert len(to_flat_state(a)) == 6 and b.to_pure_dict() == {"count": s.count}
    assert s.split(...) == s
    assert isinstance(split_state(s, ...), State)
    assert filter_state(s, Cache) == State({})


def test_split_non_exhaustive_message():
    s = make_state()
    with pytest.raises(ValueError) as info:
        s.split(Param, BatchStat)
    msg = str(info.value)
    assert msg.startswith("Non-exhaustive filters, got a non-empty remainder: ")
    assert "('count',)" in msg and "`...`" in msg
    with pytest.raises(ValueError, match="^Non-exhaustive filters, got a non-empty remainder: "):
        split_state(s, Param)


def test_ellipsis_must_be_last():
    with pytest.raises(ValueError, match="last"):
        make_state().split(..., Param)


def test_merge():
    a = State({"x": {"p": Param(1.0)}, "y": 1})
    b = State({"x": {"q": Param(2.0)}, "y": 2})
    merged = State.merge(a, b)
    assert merged.to_pure_dict() == {"x": {"p": 1.0, "q": 2.0}, "y": 2}
    assert merged.x.p is a.x.p
    assert "q" not in a.x  # inputs untouched
    assert a.merge(b) == merged
    merged.x.r = 3
    assert "r" not in a.x and "r" not in b.x
    assert merge_state(a) == a
    assert merge_state({"a": {"b": 1}}, State({"a": {"c": 2}})) == State({"a": {"b": 1, "c": 2}})
    assert merge_state(State({"a": 1}), {"a": {"b": 2}}) == State({"a": {"b": 2}})
    assert merge_state(State({"a": {"b": 2}}), {"a": 1}) == State({"a": 1})


def test_map():
    s = State({"a": {"b": 1, "c": 2}, "d": 3})
    seen = []

    def f(path, x):
        seen.append(path)
        return x * 10

    out = s.map(f)
    assert out.to_pure_dict() == {"a": {"b": 10, "c": 20}, "d": 30}
    assert sorted(seen) == [("a", "b"), ("a", "c"), ("d",)]
    assert map_state(lambda p, x: len(p), s).to_pure_dict() == {"a": {"b": 2, "c": 2}, "d": 1}


# -- pure dicts ------------------------------------------------------------------------------------
def test_to_pure_dict():
    s = make_state()
    pure = s.to_pure_dict()
    assert type(pure) is dict and type(pure["linear"]) is dict
    assert pure["layers"][0]["w"] is s.layers[0].w.get_value()
    assert pure["count"] is s.count
    assert to_pure_dict(s, lambda x: type(x).__name__)["bn"] == {
        "mean": "BatchStat",
        "var": "BatchStat",
    }


def test_replace_by_pure_dict_in_place():
    s = make_state()
    w0 = s.layers[0].w
    s.replace_by_pure_dict(
        {"layers": {"0": {"w": jnp.zeros(2)}}, "count": jnp.array(9), "bn": {"var": jnp.zeros(3)}}
    )
    assert s.layers[0].w is w0 and float(w0.get_value().sum()) == 0.0
    assert int(s.count) == 9
    np.testing.assert_allclose(s.bn.var.get_value(), 0.0)
    np.testing.assert_allclose(s.bn.mean.get_value(), 0.0)  # untouched
    replace_by_pure_dict(s, {"linear": {"bias": 1.0}}, replace_fn=lambda x, v: x.replace(v))
    assert type(s.linear.bias) is Param and s.linear.bias.get_value() == 1.0
    roundtrip = make_state()
    roundtrip.replace_by_pure_dict(make_state().to_pure_dict())
    assert roundtrip == make_state()


def test_replace_by_pure_dict_errors():
    s = make_state()
    with pytest.raises(KeyError, match=r"\('layers', 5\)"):
        s.replace_by_pure_dict({"layers": {5: {"w": 1}}})
    with pytest.raises(ValueError, match="not in the State"):  # flax raises ValueError here
        s.replace_by_pure_dict({"nope": 1})
    with pytest.raises(MissingPathError):
        s.replace_by_pure_dict({"linear": {"kernel": 1, "other": 2}})
    with pytest.raises(ValueError, match="Expected a mapping"):
        s.replace_by_pure_dict({"linear": 1})


def test_restore_int_paths():
    pure = {"layers": {"0": {"w": 1}, "10": {"w": 2}}, "1b": 3, "-1": 4}
    assert restore_int_paths(pure) == {"layers": {0: {"w": 1}, 10: {"w": 2}}, "1b": 3, "-1": 4}
    restored = restore_int_paths({"layers": {"0": {"w": jnp.zeros(2)}, "1": {"w": jnp.ones(2)}}})
    s = make_state()
    replace_by_pure_dict(s, restored)
    np.testing.assert_allclose(s.layers[1].w.get_value(), 1.0)


def test_pure_dict_semantics_match_flax():
    nnx = pytest.importorskip("flax.nnx")

    def build(P, B):
        return {
            "a": {"w": P(jnp.arange(3.0)), "s": B(jnp.ones(2))},
            "l": {0: {"k": P(jnp.ones((2, 2)))}, 1: {"k": P(jnp.zeros((2, 2)))}},
            "raw": jnp.array([1, 2]),
        }

    ours, theirs = State(build(Param, BatchStat)), nnx.State(build(nnx.Param, nnx.BatchStat))
    check = np.testing.assert_array_equal
    jax.tree.map(check, ours.to_pure_dict(), nnx.to_pure_dict(theirs))
    new = {"a": {"w": jnp.full(3, 5.0)}, "l": {"1": {"k": jnp.full((2, 2), 7.0)}}, "raw": 0}
    ours.replace_by_pure_dict(new)
    nnx.replace_by_pure_dict(theirs, new)
    jax.tree.map(check, ours.to_pure_dict(), nnx.to_pure_dict(theirs))
    assert list(ours.flat_state().paths) == [p for p, _ in nnx.to_flat_state(theirs)]
    with pytest.raises(ValueError):
        nnx.replace_by_pure_dict(theirs, {"zzz": 1})
    with pytest.raises(ValueError):
        ours.replace_by_pure_dict({"zzz": 1})


# -- property tests --------------------------------------------------------------------------------
_VARIABLE_TYPES = (Param, BatchStat, Cache)


@st.composite
def leaves(draw):
    shape = draw(st.sampled_from([(), (2,), (1, 3)]))
    value = np.full(shape, draw(st.integers(-5, 5)), dtype=np.float32)
    kind = draw(st.sampled_from((None, *_VARIABLE_TYPES)))
    return value if kind is None else kind(value)


def _level(children):
    str_keys = st.dictionaries(st.sampled_from("abcde"), children, min_size=1, max_size=4)
    int_keys = st.dictionaries(st.integers(0, 4), children, min_size=1, max_size=3)
    return st.one_of(str_keys, int_keys)


nested = st.recursive(_level(leaves()), _level, max_leaves=12)


def _filter_choices():
    return st.lists(
        st.sampled_from([Param, BatchStat, Cache, PathContains("a"), PathContains(0)]),
        min_size=1,
        max_size=3,
    )


@settings(max_examples=60, deadline=None)
@given(nested)
def test_property_flat_roundtrip(d):
    s = State(d)
    flat = to_flat_state(s)
    assert list(flat.paths) == sorted(flat.paths)
    assert from_flat_state(flat) == s
    assert flat.to_nested_state() == s
    assert State.from_flat_path(dict(flat)) == s
    leaves_, treedef = jax.tree.flatten(s)
    assert treedef.num_leaves == len(jax.tree.leaves(d)) == len(leaves_)
    assert jax.tree.unflatten(treedef, leaves_) == s


@settings(max_examples=60, deadline=None)
@given(nested, _filter_choices())
def test_property_split_merge_partition(d, filters):
    s = State(d)
    parts = s.split(*filters, ...)
    flats = [to_flat_state(p) for p in parts]
    # a partition: every path lands in exactly one part, the first filter that matches
    all_paths = [path for f in flats for path in f.paths]
    assert sorted(all_paths) == list(to_flat_state(s).paths)
    for i, f in enumerate(flats[:-1]):
        for path, leaf in f:
            assert not any(_matches(other, path, leaf) for other in filters[:i]) and _matches(
                filters[i], path, leaf
            )
    assert State.merge(*parts) == s
    assert all(a is b for a, b in zip(jax.tree.leaves(State.merge(*parts)), jax.tree.leaves(s)))
    # filter agrees with split on the filtered parts
    filtered = s.filter(*filters) if len(filters) > 1 else (s.filter(filters[0]),)
    assert list(filtered) == list(parts[:-1])


def _matches(f, path, leaf):
    from refax._filters import to_predicate

    return to_predicate(f)(path, leaf)


@settings(max_examples=40, deadline=None)
@given(nested)
def test_property_pure_dict_roundtrip(d):
    s = State(d)
    target = jax.tree.map(lambda x: x, s)  # fresh Variables with the same values
    target = jax.tree.map(np.zeros_like, target)
    target.replace_by_pure_dict(s.to_pure_dict())
    assert target == s
