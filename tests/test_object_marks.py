"""Tests for data / static marks (refax._object): nnx.data, nnx.static, nnx.dataclass, the
nnx.Data / nnx.Static annotations, the checks on static attributes, and Module error messages."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


def n_leaves(obj):
    return len(jax.tree.leaves(obj))


# -- nnx.data / nnx.static on assignment -------------------------------------------------------
class Marked(nnx.Pytree):
    def __init__(self):
        self.a = nnx.data(1)
        self.b = nnx.static(2)
        self.c = jnp.array(3)


def test_marks_are_sticky_until_remarked():
    m = Marked()
    assert n_leaves(m) == 2
    m.a = 3  # still data
    assert n_leaves(m) == 2
    m.a = nnx.static(3)
    assert n_leaves(m) == 1
    m.b = nnx.data(4)
    assert jax.tree.leaves(m)[0] == 4
    m.c = nnx.static(5)
    assert n_leaves(m) == 1


def test_static_marker_with_data_raises_and_leaves_object_unchanged():
    m = Marked()
    with pytest.raises(ValueError, match="Found data in value of type 'jax.Array'.*'b' of Marked"):
        m.b = nnx.static(jnp.array(4))
    with pytest.raises(ValueError, match="Found data in value of type 'list'"):
        m.b = nnx.static([1, nnx.Param(jnp.ones(1))])
    with pytest.raises(ValueError, match="Found data in value"):
        m.b = nnx.static(nnx.Module())
    assert m.b == 2 and m._pytree__state.static_names == {"b"}


def test_data_assigned_to_static_marked_attribute_raises():
    m = Marked()
    m.a = nnx.static(1)
    with pytest.raises(ValueError, match="Found data on value of type 'list' assigned to"):
        m.a = ["hi", jnp.array(6)]
    with pytest.raises(ValueError, match="nnx.data"):
        m.a = np.ones(2)
    assert m.a == 1
    m.a = nnx.data(np.ones(2))  # re-marking is the way out
    assert n_leaves(m) == 2 and jax.tree.leaves(m)[0] is m.a


def test_static_in_init_raises():
    class Foo(nnx.Pytree):
        def __init__(self):
            self.a = nnx.static(jnp.array(1))

    with pytest.raises(ValueError, match="Found data in value of type"):
        Foo()


def test_unmarked_plain_containers_of_state_stay_valid():
    # the spec's rule: plain lists / dicts of Variables and Modules need no wrapper
    m = nnx.Module()
    m.a = [nnx.Variable(1)]
    m.b = {"x": nnx.Module()}
    assert n_leaves(m) == 1


def test_static_mark_on_registered_data_type_is_allowed():
    class Token:
        pass

    nnx.register_data_type(Token)
    m = nnx.Module()
    t = Token()
    m.t = nnx.static(t)  # an explicit opt-out for one value
    assert n_leaves(m) == 0 and nnx.graphdef(m) == nnx.graphdef(m)


def test_marker_arguments():
    with pytest.raises(TypeError, match="not both"):
        nnx.data(1, default=2)
    with pytest.raises(TypeError, match="not both"):
        nnx.static(1, default=2)
    f = nnx.static(default=3, metadata={"doc": "x"})
    assert isinstance(f, dataclasses.Field) and f.metadata["doc"] == "x" and f.default == 3


def test_check_pytree_reports_static_marked_data():
    m = Marked()
    vars(m)["b"] = jnp.ones(1)  # bypassing __setattr__
    with pytest.raises(ValueError, match="'b'"):
        nnx.check_pytree(m)


def test_pytree_nodes_view():
    m = Marked()
    m.d = [jnp.ones(1)]
    m.e = "name"
    nodes = m._pytree__nodes
    assert dict(nodes) == {
        "_pytree__state": True,
        "a": True,
        "b": False,
        "c": True,
        "d": True,
        "e": False,
    }
    with pytest.raises(TypeError):
        nodes["a"] = False  # read-only
    with pytest.raises(AttributeError):
        m._pytree__nodes = {}


# -- nnx.dataclass and field specifiers ---------------------------------------------------------
@nnx.dataclass
class Fields(nnx.Module):
    w: jax.Array
    lr: float = nnx.data(default=0.1)
    name: str = nnx.static(default="fields")


def test_dataclass_field_specifiers():
    f = Fields(jnp.ones(2))
    leaves = jax.tree.leaves(f)  # in attribute-name order
    assert leaves[0] == 0.1 and leaves[1] is f.w
    assert Fields._refax_marks == (frozenset({"name"}), frozenset({"lr"}))
    _, state = nnx.split(f)
    assert set(state.keys()) == {"w", "lr"}
    assert "Fields(" in repr(f)  # refax's repr is kept
    with pytest.raises(ValueError, match="Found unexpected data on value of type 'jax.Array'"):
        Fields(jnp.ones(2), name=jnp.ones(1))


def test_dataclass_marks_survive_round_trips_and_jit():
    f = Fields(jnp.ones(2))
    for g in (
        nnx.merge(*nnx.split(f)),
        jax.tree.map(lambda x: x, f),
        pickle.loads(pickle.dumps(f)),
        copy.deepcopy(f),
    ):
        assert g._pytree__state.data_names == {"lr"}
        assert g._pytree__state.static_names == {"name"}

    @nnx.jit
    def step(m):
        m.lr = m.lr * 2  # a traced leaf: lr is data

    step(f)
    step(f)
    assert float(f.lr) == pytest.approx(0.4)


def test_dataclass_options_and_inheritance():
    @nnx.dataclass(kw_only=True)
    class Sub(Fields):
        lr: float = nnx.static(default=0.5)  # a subclass may re-declare a field

    s = Sub(w=jnp.ones(1))
    assert Sub._refax_marks == (frozenset({"name", "lr"}), frozenset())
    assert jax.tree.leaves(s) == [s.w]
    with pytest.raises(TypeError, match="Pytree"):
        nnx.dataclass(type("Plain", (), {}))


def test_field_specifiers_work_with_plain_dataclasses():
    @dataclasses.dataclass
    class Bar(nnx.Pytree):
        a: int = nnx.data(default=3)

    assert jax.tree.leaves(Bar()) == [3]


def test_conflicting_declarations_raise():
    with pytest.raises(ValueError, match="keep one"):
        with pytest.warns(DeprecationWarning):

            class Bad(nnx.Pytree):
                a: nnx.Static[int] = nnx.data()


# -- nnx.Data / nnx.Static annotations ----------------------------------------------------------
def test_annotations_mark_attributes_and_warn():
    with pytest.warns(DeprecationWarning, match="annotations are deprecated"):

        @dataclasses.dataclass
        class Foo(nnx.Pytree):
            a: nnx.Data[int]
            b: nnx.Static[int]
            c: jax.Array

    foo = Foo(a=1, b=2, c=jnp.array(3))
    assert n_leaves(foo) == 2
    foo.a = nnx.static(3)
    assert n_leaves(foo) == 1
    foo.b = nnx.data(4)
    assert n_leaves(foo) == 2
    with pytest.raises(ValueError, match="Found data on value of type"):
        foo.a = ["hi", jnp.array(6)]
    with pytest.raises(ValueError, match="Found data in value of type"):
        foo.b = nnx.static(jnp.array(4))


def test_string_annotations_are_resolved():
    # this module uses `from __future__ import annotations`: annotations are strings here
    with pytest.warns(DeprecationWarning):

        class Foo(nnx.Module):
            a: nnx.Data[int]
            b: nnx.Static[list[int]]
            c: Data  # noqa: F821 (an unrelated name: ignored)

    assert Foo._refax_marks == (frozenset({"b"}), frozenset({"a"}))


def test_annotation_aliases_are_typing_annotated():
    assert nnx.Data[int].__origin__ is int
    assert nnx.Static[str].__metadata__[0] is not nnx.Data[str].__metadata__[0]


# -- Module error messages ------------------------------------------------------------------
class Sower(nnx.Module):
    def __init__(self):
        self.y = 10
        self.p = nnx.Param(1)


def test_sow_and_perturb_errors_name_the_problem():
    m = Sower()
    with pytest.raises(ValueError, match="Sower.y: expected the attribute to be a Variable, got"):
        m.sow(nnx.Intermediate, "y", 1)
    with pytest.raises(ValueError, match="to be of type Intermediate, got Param"):
        m.sow(nnx.Intermediate, "p", 1)
    with pytest.raises(ValueError, match="to be a Variable, got int"):
        m.perturb("y", jnp.ones(1))
    with pytest.raises(ValueError, match="to be of type Perturbation, got Param"):
        m.perturb("p", jnp.ones(1))


def test_set_attributes_error_lists_missing_names():
    m = Sower()
    with pytest.raises(ValueError, match=r"following attributes: \['unknown'\]"):
        m.set_attributes(y=1, unknown=True)
    m.set_attributes(y=2, unknown=True, raise_if_not_found=False)
    assert m.y == 2


# -- against the reference implementation -------------------------------------------------------
def test_oracle_leaves_match_flax():
    flax_nnx = pytest.importorskip("flax.nnx")

    def build(lib):
        @lib.dataclass
        class Foo(lib.Pytree):
            w: jax.Array
            a: int = lib.data(default=1)
            b: int = lib.static(default=2)

        foo = Foo(jnp.ones(2))
        foo.b = lib.data(5)
        foo.a = lib.static(6)
        return foo

    ours, theirs = build(nnx), build(flax_nnx)
    assert [np.asarray(x).tolist() for x in jax.tree.leaves(ours)] == [
        np.asarray(x).tolist() for x in jax.tree.leaves(theirs)
    ]
