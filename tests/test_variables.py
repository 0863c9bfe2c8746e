"""Tests for refax._variables: Variable boxes, operators, metadata, pytree behaviour, tracing."""

import copy
import operator
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import errors, nnx


class Count(nnx.Variable):
    pass


class Holder(nnx.Module):
    def __init__(self, v):
        self.v = v


# -- value access --------------------------------------------------------------------------
def test_value_get_set_and_identity():
    v = nnx.Variable(jnp.arange(4.0))
    h = Holder(v)
    assert v.value is v[...] is v.get_value() is v.get_raw_value()
    v.value = jnp.ones(4)
    np.testing.assert_array_equal(h.v[...], np.ones(4))
    v[...] = jnp.full(4, 3.0)
    np.testing.assert_array_equal(v.value, np.full(4, 3.0))
    v.set_value(jnp.zeros(4))
    np.testing.assert_array_equal(v[...], np.zeros(4))
    v.set_value(nnx.Param(jnp.full(4, 2.0)))  # a Variable is unwrapped
    assert isinstance(v.value, jax.Array) and float(v.value[0]) == 2.0
    assert h.v is v


def test_indexing_and_slicing():
    v = nnx.Variable(jnp.arange(4.0))
    old = v.value
    v[0] = 5
    np.testing.assert_array_equal(v.value, [5.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(old, [0.0, 1.0, 2.0, 3.0])  # old buffer untouched
    np.testing.assert_array_equal(v[1:], [1.0, 2.0, 3.0])
    v[1:] = jnp.array([7.0, 8.0, 9.0])
    np.testing.assert_array_equal(v[...], [5.0, 7.0, 8.0, 9.0])
    v[...] = 0.5  # broadcasts when shapes differ
    np.testing.assert_array_equal(v[...], np.full(4, 0.5))
    assert v.get_value(index=2) == 0.5
    v.set_value(4.0, index=slice(0, 2))
    np.testing.assert_array_equal(v[...], [4.0, 4.0, 0.5, 0.5])
    m = nnx.Variable(jnp.zeros((2, 3)))
    m[1, 2] = 1.0
    assert float(m[1, 2]) == 1.0 and float(m[...].sum()) == 1.0


def test_numpy_value_setitem_does_not_touch_callers_array():
    a = np.zeros(3)
    v = nnx.Variable(a)
    v[1] = 4
    np.testing.assert_array_equal(v[...], [0, 4, 0])
    np.testing.assert_array_equal(a, [0, 0, 0])


def test_augmented_value_updates():
    v = nnx.Variable(jnp.array([1.0, 2.0]))
    h = Holder(v)
    v[...] += 1
    np.testing.assert_array_equal(h.v[...], [2.0, 3.0])
    v.value += 1
    np.testing.assert_array_equal(h.v[...], [3.0, 4.0])
    v[0] *= 10
    np.testing.assert_array_equal(h.v[...], [30.0, 4.0])
    s = Count(jnp.array(0))
    s[...] += 1
    assert int(s[...]) == 1


INPLACE = [
    (operator.iadd, operator.add),
    (operator.isub, operator.sub),
    (operator.imul, operator.mul),
    (operator.itruediv, operator.truediv),
    (operator.ifloordiv, operator.floordiv),
    (operator.imod, operator.mod),
    (operator.ipow, operator.pow),
    (operator.ilshift, operator.lshift),
    (operator.irshift, operator.rshift),
    (operator.iand, operator.and_),
    (operator.ior, operator.or_),
    (operator.ixor, operator.xor),
]


@pytest.mark.parametrize("iop,op", INPLACE, ids=lambda f: f.__name__)
def test_inplace_operators_keep_identity(iop, op):
    x = jnp.array([3, 6, 9])
    other = jnp.array([1, 2, 3])
    v = Count(x)
    h = Holder(v)
    out = iop(v, other)
    assert out is v and h.v is v and type(v) is Count
    np.testing.assert_array_equal(v[...], op(x, other))


def test_inplace_matmul_and_variable_operand():
    v = nnx.Variable(jnp.eye(2) * 2)
    ident = v
    v @= jnp.array([[1.0, 2.0], [3.0, 4.0]])
    assert v is ident
    np.testing.assert_allclose(v[...], [[2.0, 4.0], [6.0, 8.0]])
    v += nnx.Variable(jnp.ones((2, 2)))
    np.testing.assert_allclose(v[...], [[3.0, 5.0], [7.0, 9.0]])


def test_module_attribute_augmented_assignment_in_place():
    v = Count(jnp.array(1))
    h = Holder(v)
    h.v += 2
    h.v *= 3
    assert h.v is v and int(v[...]) == 9


BINARY = [
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.lshift,
    operator.rshift,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
]


@pytest.mark.parametrize("op", BINARY, ids=lambda f: f.__name__)
def test_binary_operators_match_jnp(op):
    a, b = jnp.array([5, 6, 7, 8]), jnp.array([1, 2, 3, 2])
    va, vb = nnx.Variable(a), Count(b)
    np.testing.assert_array_equal(op(va, b), op(a, b))
    np.testing.assert_array_equal(op(va, vb), op(a, b))
    np.testing.assert_array_equal(op(va, 2), op(a, 2))
    if op not in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge):
        np.testing.assert_array_equal(op(2, vb), op(2, b))  # reflected


def test_matmul_forward_and_reflected():
    a = jnp.arange(6.0).reshape(2, 3)
    b = jnp.arange(12.0).reshape(3, 4)
    va, vb = nnx.Param(a), nnx.Param(b)
    np.testing.assert_allclose(va @ b, a @ b)
    np.testing.assert_allclose(a @ vb, a @ b)
    np.testing.assert_allclose(va @ vb, a @ b)
    x = np.arange(2.0)
    np.testing.assert_allclose(x @ va, x @ np.asarray(a))


def test_unary_divmod_and_conversions():
    v = nnx.Variable(jnp.array([-3, 4]))
    np.testing.assert_array_equal(-v, [3, -4])
    np.testing.assert_array_equal(+v, [-3, 4])
    np.testing.assert_array_equal(abs(v), [3, 4])
    np.testing.assert_array_equal(~v, [2, -5])
    assert divmod(nnx.Variable(7), 2) == (3, 1)
    assert divmod(7, nnx.Variable(2)) == (3, 1)
    s = nnx.Variable(jnp.array(3))
    assert int(s) == 3 and float(s) == 3.0 and bool(s) and range(10)[s] == 3
    assert len(v) == 2 and [int(x) for x in v] == [-3, 4]


def test_array_protocol_and_properties():
    v = nnx.Param(jnp.ones((2, 3), jnp.bfloat16))
    assert v.shape == (2, 3) and v.dtype == jnp.bfloat16 and v.ndim == 2 and v.size == 6
    a = jnp.asarray(v)
    assert isinstance(a, jax.Array) and a.dtype == jnp.bfloat16
    n = np.asarray(nnx.Param(jnp.arange(3)))
    assert isinstance(n, np.ndarray) and n.tolist() == [0, 1, 2]
    assert np.asarray(nnx.Param(jnp.arange(3)), dtype=np.float64).dtype == np.float64
    assert float(jnp.sum(v)) == 6.0
    # attributes the Variable does not define are forwarded to the value
    assert v.T.shape == (3, 2) and float(v.sum()) == 6.0
    np.testing.assert_array_equal(v.at[0, 0].set(5)[0], [5, 1, 1])
    with pytest.raises(AttributeError, match="nonexistent"):
        v.nonexistent  # noqa: B018
    with pytest.raises(TypeError):
        hash(v)


# -- metadata --------------------------------------------------------------------------------
def test_default_and_constructor_metadata():
    assert nnx.Variable(1.0).get_metadata() == {
        "hijax": False,
        "ref": False,
        "eager_sharding": True,
    }
    p = nnx.Param(jnp.ones(2), tag="x", sharding_names=("a",))
    meta = p.get_metadata()
    assert meta["tag"] == "x" and meta["out_sharding"] == ("a",)
    assert "sharding_names" not in meta
    assert p.tag == "x" and p.sharding_names == ("a",) and p.out_sharding == ("a",)


def test_metadata_get_set_has_del():
    v = nnx.Param(1.0, foo=3)
    assert v.has_metadata("foo") and v.get_metadata("foo") == 3
    assert v.get_metadata("bar", 7) == 7
    with pytest.raises(KeyError):
        v.get_metadata("bar")
    v.set_metadata(bar=1)
    v.set_metadata("baz", 2)
    assert v.bar == 1 and v.baz == 2
    v.foo = 4  # attribute assignment sets metadata
    assert v.get_metadata("foo") == 4
    v.del_metadata("bar")
    del v.baz
    assert not v.has_metadata("bar") and not v.has_metadata("baz")
    v.set_metadata({"only": 1})  # a mapping replaces everything
    assert v.get_metadata() == {"only": 1}
    meta = v.get_metadata()
    meta["x"] = 1  # get_metadata() returns a copy
    assert not v.has_metadata("x")
    with pytest.raises(TypeError):
        v.set_metadata("a", 1, 2)


def test_sharding_names_alias():
    v = nnx.Param(jnp.ones(2))
    v.sharding_names = ("data",)
    assert v.get_metadata("out_sharding") == ("data",)
    assert v.has_metadata("sharding_names") and v.sharding_names == ("data",)
    v.set_metadata(sharding_names=("model",))
    assert v.out_sharding == ("model",)
    v.del_metadata("sharding_names")
    assert not v.has_metadata("out_sharding")


def test_required_metadata():
    class Axis(nnx.Variable):
        required_metadata = frozenset({"axis"})

    with pytest.raises(TypeError, match="axis"):
        Axis(1.0)
    assert Axis(1.0, axis=0).axis == 0


# -- copies ------------------------------------------------------------------------------------
def test_replace_copy_copy_from():
    v = nnx.Param(jnp.ones(2), tag="t")
    r = v.replace(jnp.zeros(3))
    assert type(r) is nnx.Param and r is not v and r.tag == "t"
    np.testing.assert_array_equal(r[...], np.zeros(3))
    np.testing.assert_array_equal(v[...], np.ones(2))
    r2 = v.replace(tag="u")
    assert r2.tag == "u" and v.tag == "t" and r2[...] is v[...]
    c = v.copy()
    assert c is not v and c[...] is v[...] and c.get_metadata() == v.get_metadata()
    c.set_metadata(tag="other")
    assert v.tag == "t"
    assert copy.copy(v).get_metadata() == v.get_metadata()
    a = nnx.Param(jnp.ones(2))
    ident = a
    a.copy_from(nnx.Param(jnp.zeros(2), tag="q"))
    assert a is ident and a.tag == "q"
    np.testing.assert_array_equal(a[...], np.zeros(2))


def test_deepcopy_and_pickle_keep_type_metadata_and_sharing():
    v = Count(jnp.arange(3), tag="c")
    for clone in (copy.deepcopy([v, v]), pickle.loads(pickle.dumps([v, v]))):
        a, b = clone
        assert a is b and a is not v and type(a) is Count
        assert a.get_metadata() == v.get_metadata()
        np.testing.assert_array_equal(a[...], [0, 1, 2])
        a[...] = jnp.zeros(3, jnp.int32)  # independent of the original, mutable again
        assert int(v[...].sum()) == 3


# -- pytree ------------------------------------------------------------------------------------
def test_pytree_flatten_unflatten():
    v = nnx.Param(jnp.ones(2), tag="t")
    leaves, treedef = jax.tree.flatten(v)
    assert len(leaves) == 1 and leaves[0] is v[...]
    w = jax.tree.unflatten(treedef, [jnp.zeros(2)])
    assert type(w) is nnx.Param and w.tag == "t" and float(w[...].sum()) == 0.0
    ((path, _),) = jax.tree_util.tree_flatten_with_path(v)[0]
    assert path == (jax.tree_util.GetAttrKey("value"),)
    assert jax.tree.structure(nnx.Param(1.0, a=1)) == jax.tree.structure(nnx.Param(2.0, a=1))
    assert jax.tree.structure(nnx.Param(1.0, a=1)) != jax.tree.structure(nnx.Param(1.0, a=2))
    assert jax.tree.structure(nnx.Param(1.0)) != jax.tree.structure(nnx.BatchStat(1.0))


def test_pytree_under_jit_tree_map_and_grad():
    v = Count(jnp.ones(2), tag="t")
    doubled = jax.tree.map(lambda x: x * 2, v)
    assert type(doubled) is Count and doubled.tag == "t" and doubled is not v
    np.testing.assert_array_equal(doubled[...], [2.0, 2.0])
    np.testing.assert_array_equal(v[...], [1.0, 1.0])

    @jax.jit
    def f(var):
        var[...] += 1  # the traced copy was created inside this trace: mutable
        return var

    out = f(v)
    assert type(out) is Count and out.tag == "t"
    np.testing.assert_array_equal(out[...], [2.0, 2.0])
    np.testing.assert_array_equal(v[...], [1.0, 1.0])
    g = jax.grad(lambda p: (p[...] ** 2).sum())(nnx.Param(jnp.array([1.0, 3.0])))
    assert type(g) is nnx.Param
    np.testing.assert_allclose(g[...], [2.0, 6.0])


# -- tracing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v.__setitem__(..., jnp.ones(3, jnp.int32)),
        lambda v: setattr(v, "value", jnp.ones(3, jnp.int32)),
        lambda v: v.__iadd__(1),
        lambda v: v.set_value(jnp.ones(3, jnp.int32)),
        lambda v: v.set_metadata(tag="x"),
    ],
    ids=["setitem", "value", "iadd", "set_value", "set_metadata"],
)
def test_trace_context_error_on_closure_capture(mutate):
    c = Count(jnp.arange(3))

    @jax.jit
    def f():
        mutate(c)
        return c[...]

    with pytest.raises(errors.TraceContextError) as info:
        f()
    msg = str(info.value)
    assert msg.startswith("Cannot mutate Count from a different trace level")
    assert msg == (
        "Cannot mutate Count from a different trace level (https://flax.readthedocs.io/en/"
        "latest/api_reference/flax.errors.html#flax.errors.TraceContextError)"
    )  # exactly the documented message; the fix is in a note, which tracebacks show
    assert any("as an argument" in note for note in info.value.__notes__)
    assert isinstance(info.value, RuntimeError)
    np.testing.assert_array_equal(c[...], [0, 1, 2])


def test_reading_captured_and_mutating_local_variables_in_jit():
    c = Count(jnp.arange(3))

    @jax.jit
    def f(x):
        local = Count(x)
        local[...] += c[...]
        local.value = local.value * 2
        return local[...]

    np.testing.assert_array_equal(f(jnp.ones(3, jnp.int32)), [2, 4, 6])


# -- construction helpers, names -----------------------------------------------------------
def test_with_metadata_and_variable_metadata():
    init = nnx.with_metadata(jax.nn.initializers.ones, sharding_names=("x",), foo=1)
    p = nnx.Param(init(jax.random.key(0), (2,)))
    assert p.out_sharding == ("x",) and p.foo == 1
    np.testing.assert_array_equal(p[...], [1.0, 1.0])
    assert init.__wrapped__ is jax.nn.initializers.ones
    outer = nnx.with_metadata(init, foo=2, bar=3)
    q = nnx.Param(outer(jax.random.key(0), (1,)))
    assert (q.foo, q.bar, q.out_sharding) == (2, 3, ("x",))
    r = nnx.Param(nnx.VariableMetadata(jnp.zeros(2), {"a": 1}), b=2)
    assert r.a == 1 and r.b == 2 and r.shape == (2,)


def test_variable_names_registry():
    assert nnx.variable_type_from_name("params") is nnx.Param
    assert nnx.variable_name_from_type(nnx.BatchStat) == "batch_stats"

    class SubParam(nnx.Param):
        pass

    assert nnx.variable_name_from_type(SubParam) == "params"  # via the MRO
    with pytest.raises(ValueError, match="refax_test_unknown"):
        nnx.variable_type_from_name("refax_test_unknown")
    t = nnx.variable_type_from_name("refax_test_coll", allow_register=True)
    assert issubclass(t, nnx.Variable) and nnx.variable_type_from_name("refax_test_coll") is t
    assert nnx.variable_name_from_type(t) == "refax_test_coll"

    @nnx.register_variable_name("refax_test_deco")
    class Deco(nnx.Variable):
        pass

    assert nnx.variable_type_from_name("refax_test_deco") is Deco
    with pytest.raises(ValueError, match="already registered"):
        nnx.register_variable_name("refax_test_deco", Count)
    nnx.register_variable_name("refax_test_deco", Count, overwrite=True)
    assert nnx.variable_type_from_name("refax_test_deco") is Count


def test_user_subclass():
    c = Count(jnp.array(0))
    assert isinstance(c, nnx.Variable) and not isinstance(c, nnx.Param)
    assert c.type is Count and c.var_type is Count
    h = Holder(c)
    _, counts, rest = nnx.split(h, Count, ...)
    assert counts["v"] is c and len(rest) == 0
    assert issubclass(nnx.Perturbation, nnx.Intermediate)


def test_repr_format():
    assert repr(Count(jnp.arange(10))) == (
        "Count( # 10 (40 B)\n  value=Array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=int32)\n)"
    )
    r = repr(nnx.Param(jnp.ones(2), tag="t"))
    assert r.startswith("Param( # 2 (8 B)\n  value=Array([1., 1.], dtype=float32)")
    assert "tag='t'" in r and "hijax" not in r
