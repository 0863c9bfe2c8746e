"""Tests for refax._filters: literals, filter classes, composition, and agreement with flax."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refax import _filters as F
from refax import _variables as V


class Count(V.Variable):
    pass


def _vars(lib):
    """One value of each kind, built from ``lib`` (refax._variables or flax.nnx)."""
    return {
        "param": lib.Param(jnp.ones(2)),
        "bstat": lib.BatchStat(jnp.zeros(2)),
        "cache": lib.Cache(jnp.zeros(1)),
        "inter": lib.Intermediate(jnp.zeros(1)),
        "perturb": lib.Perturbation(jnp.zeros(1)),
        "tagged": lib.Param(jnp.ones(1), tag="frozen"),
        "other_tag": lib.BatchStat(jnp.ones(1), tag="ema"),
        "array": jnp.ones(3),
        "numpy": np.ones(3),
        "int": 3,
    }


VALUES = _vars(V)
PATHS = [(), ("kernel",), ("layers", 0, "kernel"), ("bn", "mean"), ("head", 1, "bias"), (0,)]


# -- literals ----------------------------------------------------------------------------------


def test_type_literal():
    p = F.to_predicate(V.Param)
    assert p == F.OfType(V.Param)
    assert p((), VALUES["param"]) and p((), VALUES["tagged"])
    assert not p((), VALUES["bstat"]) and not p((), VALUES["array"])
    assert F.to_predicate(V.Variable)((), VALUES["cache"])
    assert F.to_predicate(V.Intermediate)((), VALUES["perturb"])  # subclass
    assert F.to_predicate(Count)((), Count(0)) and not F.to_predicate(Count)((), VALUES["param"])
    assert F.to_predicate(jnp.ndarray)((), VALUES["array"])


def test_of_type_matches_type_attribute():
    class Desc:  # something describing a Variable without being one
        type = V.Param

    assert F.OfType(V.Param)((), Desc()) and F.OfType(V.Variable)((), Desc())
    assert not F.OfType(V.BatchStat)((), Desc())

    class NotAClass:
        type = "param"

    assert not F.OfType(V.Param)((), NotAClass())


def test_str_literal():
    p = F.to_predicate("frozen")
    assert p == F.WithTag("frozen")
    assert p((), VALUES["tagged"])
    assert not p((), VALUES["param"])  # no tag metadata: no AttributeError leaks
    assert not p((), VALUES["other_tag"]) and not p((), VALUES["array"]) and not p((), 3)


def test_with_tag_none_needs_the_attribute():
    assert not F.WithTag(None)((), VALUES["param"])
    assert F.WithTag(None)((), V.Param(1.0, tag=None))


@pytest.mark.parametrize("lit", [..., True])
def test_everything_literals(lit):
    p = F.to_predicate(lit)
    assert p == F.Everything() and isinstance(p, F.Everything)
    assert all(p(path, v) for path in PATHS for v in VALUES.values())


@pytest.mark.parametrize("lit", [None, False])
def test_nothing_literals(lit):
    p = F.to_predicate(lit)
    assert p == F.Nothing()
    assert not any(p(path, v) for path in PATHS for v in VALUES.values())


@pytest.mark.parametrize("lit", [(V.Param, "ema"), [V.Param, "ema"]])
def test_sequence_literal(lit):
    p = F.to_predicate(lit)
    assert p == F.Any(V.Param, "ema")
    assert p((), VALUES["param"]) and p((), VALUES["other_tag"]) and not p((), VALUES["cache"])
    assert F.to_predicate(()) == F.Any() and not F.to_predicate(())((), VALUES["param"])


def test_callables_pass_through():
    f = F.PathContains("kernel")
    assert F.to_predicate(f) is f
    fn = lambda path, x: len(path) == 1
    assert F.to_predicate(fn) is fn
    assert F.to_predicate([fn, V.Cache])(("a",), 1)


@pytest.mark.parametrize("bad", [3, 1.5, b"x", object(), {"a": 1}, {V.Param}, (V.Param, 7)])
def test_bad_filter_raises_type_error(bad):
    with pytest.raises(TypeError, match="Invalid filter") as info:
        F.to_predicate(bad)
    msg = str(info.value)
    assert "a type" in msg and "str" in msg and "tuple or list" in msg and "callable" in msg
    bad_item = 7 if isinstance(bad, tuple) else bad
    assert repr(bad_item) in msg and type(bad_item).__name__ in msg


def test_bool_and_int_do_not_share_cache():
    assert F.to_predicate(True) == F.Everything()
    with pytest.raises(TypeError):
        F.to_predicate(1)
    assert F.to_predicate((False,)) == F.Any(F.Nothing())
    with pytest.raises(TypeError):
        F.to_predicate((0,))


def test_to_predicate_is_cached_and_handles_unhashable():
    assert F.to_predicate(V.Param) is F.to_predicate(V.Param)
    assert F.to_predicate((V.Param, "a")) is F.to_predicate((V.Param, "a"))
    assert F.to_predicate([V.Param, "a"]) == F.to_predicate((V.Param, "a"))
    unhashable = F.WithTag(["a"])  # a filter object with an unhashable field
    p = F.to_predicate((unhashable, V.Param))
    assert p((), VALUES["param"])
    assert F.to_predicate([[V.Param], ["a"]])((), VALUES["param"])


# -- classes -----------------------------------------------------------------------------------


def test_path_contains():
    exact = F.PathContains("kernel")
    assert exact(("layers", 0, "kernel"), None) and not exact(("kernels",), None)
    assert F.PathContains(0)(("layers", 0), None) and not F.PathContains(1)(("layers", 0), None)
    loose = F.PathContains("kern", exact=False)
    assert loose(("kernel",), None) and not loose(("bias",), None) and not loose((), None)
    assert F.PathContains(1, exact=False)(("layer_12",), None)
    assert F.PathContains("a", exact=False)(("xa",), None)


def test_path_in():
    f = F.PathIn(("a", 0), ["b"])
    assert f(("a", 0), None) and f(("b",), None) and not f(("a",), None)
    assert f == F.PathIn(("b",), ("a", 0))


def test_composition():
    kernels = F.All(V.Param, F.PathContains("kernel"))
    assert kernels(("kernel",), VALUES["param"]) and not kernels(("bias",), VALUES["param"])
    assert not kernels(("kernel",), VALUES["bstat"])
    f = F.Any(F.All(V.Param, F.Not("frozen")), F.All(V.BatchStat, F.PathContains("bn")))
    assert f(("x",), VALUES["param"]) and not f(("x",), VALUES["tagged"])
    assert f(("bn", "mean"), VALUES["bstat"]) and not f(("ln", "mean"), VALUES["bstat"])
    assert F.Not(F.Not(V.Param))((), VALUES["param"])
    assert F.All()((), 0) and not F.Any()((), 0)
    assert F.Not(...)((), 0) is False and F.Not(None)((), 0) is True


def test_equality_and_hashing():
    assert F.OfType(V.Param) == F.OfType(V.Param) != F.OfType(V.BatchStat)
    assert F.Any(V.Param, "a") == F.Any(F.OfType(V.Param), F.WithTag("a"))
    assert F.Any(V.Param, "a") != F.Any("a", V.Param)  # order kept, like NNX
    assert F.Any(V.Param) != F.All(V.Param) and F.Any(V.Param) != F.OfType(V.Param)
    assert F.PathContains("k") != F.PathContains("k", exact=False)
    assert F.Not(V.Param) == F.Not(V.Param) and F.Everything() == F.Everything()
    assert F.Everything() != F.Nothing() and F.OfType(V.Param) != V.Param
    table = {F.All(V.Param, F.Not("x")): 1, F.PathContains("k"): 2, F.Everything(): 3}
    assert table[F.All(V.Param, F.Not(F.WithTag("x")))] == 1
    assert table[F.PathContains("k", exact=True)] == 2 and table[F.Everything()] == 3
    assert hash(F.Any(V.Param, "a")) == hash(F.Any(V.Param, "a"))
    assert not isinstance(F.All(V.Param), F.Any)


def test_repr():
    assert repr(F.OfType(V.Param)) == "OfType(Param)"
    assert repr(F.WithTag("params")) == "WithTag('params')"
    assert repr(F.PathContains("kernel")) == "PathContains('kernel')"
    assert repr(F.PathContains(0, exact=False)) == "PathContains(0, exact=False)"
    assert repr(F.Any(V.Param, V.BatchStat)) == "Any(Param, BatchStat)"
    assert repr(F.All(V.Param, "a", F.Not(Count))) == "All(Param, WithTag('a'), Not(Count))"
    assert repr(F.Everything()) == "Everything()" and repr(F.Nothing()) == "Nothing()"
    assert repr(F.PathIn(("a",))) == "PathIn(('a',))"


def test_filters_to_predicates():
    preds = F.filters_to_predicates((V.Param, "a", ...))
    assert preds == (F.OfType(V.Param), F.WithTag("a"), F.Everything())
    assert F.filters_to_predicates([V.Param, ..., True]) == (
        F.OfType(V.Param),
        F.Everything(),
        F.Everything(),
    )
    assert F.filters_to_predicates(()) == ()
    for bad in [(..., V.Param), (V.Param, True, "a"), (F.Everything(), None)]:
        with pytest.raises(ValueError, match="last filter"):
            F.filters_to_predicates(bad)
    with pytest.raises(TypeError, match="Invalid filter"):
        F.filters_to_predicates((V.Param, 2.0))


# -- properties --------------------------------------------------------------------------------

keys = st.one_of(
    st.sampled_from(["kernel", "bias", "bn", "mean", "layers", "head"]), st.integers(0, 3)
)
paths = st.lists(keys, max_size=4).map(tuple)
values = st.sampled_from(list(VALUES.values()))
leaf_filters = st.one_of(
    st.sampled_from([V.Param, V.BatchStat, V.Variable, V.Intermediate, "frozen", "ema", ...]),
    st.sampled_from([None, True, False, jnp.ndarray]),
    keys.map(F.PathContains),
    st.sampled_from(["ker", "a", "1"]).map(lambda k: F.PathContains(k, exact=False)),
)
filters = st.recursive(
    leaf_filters,
    lambda sub: st.one_of(
        st.lists(sub, max_size=3).map(tuple),
        st.lists(sub, max_size=3).map(lambda fs: F.Any(*fs)),
        st.lists(sub, max_size=3).map(lambda fs: F.All(*fs)),
        sub.map(F.Not),
    ),
    max_leaves=8,
)


@given(filters, paths, values)
def test_not_is_complement(f, path, value):
    p = F.to_predicate(f)
    assert F.Not(f)(path, value) == (not p(path, value))
    assert F.Any(f, F.Not(f))(path, value)
    assert not F.All(f, F.Not(f))(path, value)
    assert F.to_predicate(f) == F.to_predicate(f)
    assert hash(F.to_predicate(f)) == hash(F.to_predicate(f))


# -- oracle ------------------------------------------------------------------------------------


# Cases are library-neutral: types are looked up by name in each library, and tagged tuples
# ("path"/"all"/"any"/"not", ...) build that library's filter objects.
ORACLE_CASES = [
    V.Param,
    V.Variable,
    V.Intermediate,
    "frozen",
    ...,
    True,
    None,
    False,
    (V.Param, "ema"),
    [V.Cache, V.Perturbation],
    ("path", "kernel", True),
    ("path", 0, True),
    ("path", "ker", False),
    ("all", V.Param, ("path", "ker", False)),
    ("not", [V.BatchStat, "frozen"]),
    ("any", ("not", V.Param), ("path", "bn", True)),
]


def _build(case, lib, flib):
    if isinstance(case, type):
        return getattr(lib, case.__name__)
    if isinstance(case, list):
        return [_build(c, lib, flib) for c in case]
    if isinstance(case, tuple) and case and case[0] == "path":
        return flib.PathContains(case[1], exact=case[2])
    if isinstance(case, tuple) and case and case[0] in ("all", "any", "not"):
        cls = {"all": flib.All, "any": flib.Any, "not": flib.Not}[case[0]]
        return cls(*(_build(c, lib, flib) for c in case[1:]))
    if isinstance(case, tuple):
        return tuple(_build(c, lib, flib) for c in case)
    return case


@pytest.mark.parametrize("case", ORACLE_CASES, ids=repr)
def test_agrees_with_flax(case):
    nnx = pytest.importorskip("flax.nnx")
    filterlib = nnx.filterlib
    ours = F.to_predicate(_build(case, V, F))
    theirs = filterlib.to_predicate(_build(case, nnx, filterlib))
    flax_values = _vars(nnx)
    for path in PATHS:
        for name, value in VALUES.items():
            got, want = ours(path, value), theirs(path, flax_values[name])
            assert bool(got) == bool(want), (case, path, name)
    assert repr(ours).split("(")[0] == repr(theirs).split("(")[0]
