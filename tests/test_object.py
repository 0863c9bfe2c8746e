"""Tests for refax._object: Object/Module attributes, mutation rules, Module helpers, pytrees."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import errors, nnx


class Count(nnx.Variable):
    pass


class Linear(nnx.Module):
    def __init__(self, din, dout):
        self.w = nnx.Param(jnp.arange(din * dout, dtype=jnp.float32).reshape(din, dout))
        self.b = nnx.Param(jnp.zeros(dout))
        self.din, self.dout = din, dout

    def __call__(self, x):
        return x @ self.w + self.b


class Dropoutish(nnx.Module):
    def __init__(self):
        self.deterministic = False
        self.rate = 0.5


class Normish(nnx.Module):
    def __init__(self):
        self.use_running_average = False
        self.mean = nnx.BatchStat(jnp.zeros(2))


class Block(nnx.Module):
    def __init__(self):
        self.linear = Linear(2, 2)
        self.drop = Dropoutish()
        self.norm = Normish()


class Kinds(nnx.Module):
    def __init__(self):
        self.count = Count(jnp.array(0))
        self.sub = Linear(2, 3)
        self.layers = [Linear(3, 3), Linear(3, 1)]
        self.table = {"stat": nnx.BatchStat(jnp.ones(1)), "n": 3}
        self.pair = (Linear(1, 1), "tag")
        self.jarr = jnp.arange(3)
        self.narr = np.arange(2)
        self.name = "kinds"
        self.size = 7
        self.fn = jnp.tanh


def flat_paths(state):
    return {p for p, _ in nnx.to_flat_state(state)}


# -- attribute kinds ----------------------------------------------------------------------
def test_attribute_kinds_split_into_state_and_graphdef():
    m = Kinds()
    _, state = nnx.split(m)
    assert flat_paths(state) == {
        ("count",),
        ("sub", "w"),
        ("sub", "b"),
        ("layers", 0, "w"),
        ("layers", 0, "b"),
        ("layers", 1, "w"),
        ("layers", 1, "b"),
        ("table", "stat"),
        ("pair", 0, "w"),
        ("pair", 0, "b"),
        ("jarr",),
        ("narr",),
    }
    assert state["jarr"] is m.jarr and state["narr"] is m.narr
    assert state["count"] is m.count
    m2 = nnx.merge(*nnx.split(m))
    assert (m2.name, m2.size, m2.fn, m2.table["n"], m2.pair[1]) == ("kinds", 7, jnp.tanh, 3, "tag")
    assert isinstance(m2.layers, list) and isinstance(m2.pair, tuple)
    # static values are part of the GraphDef
    other = Kinds()
    assert nnx.graphdef(other) == nnx.graphdef(m)
    other.size = 8
    assert nnx.graphdef(other) != nnx.graphdef(m)
    other = Kinds()
    other.table["n"] = 4
    assert nnx.graphdef(other) != nnx.graphdef(m)


def test_assigning_values_to_variable_attributes_updates_in_place():
    m = Kinds()
    c = m.count
    m.count += 1
    assert m.count is c and int(c[...]) == 1
    m.count = jnp.array(5)
    assert m.count is c and int(c[...]) == 5
    m.count = 7
    assert m.count is c and int(c[...]) == 7
    m.count = np.int32(9)
    assert m.count is c and int(c[...]) == 9
    new = Count(jnp.array(100))
    m.count = new  # a Variable rebinds
    assert m.count is new and int(c[...]) == 9
    sub = Linear(1, 1)
    m.sub = sub  # so does a Module
    assert m.sub is sub
    m.jarr = jnp.zeros(2)  # raw arrays are plain attributes: rebinding replaces them
    np.testing.assert_array_equal(nnx.state(m)["jarr"], [0.0, 0.0])


class Counter(nnx.Module):
    def __init__(self):
        self.count = Count(jnp.array(0))

    def __call__(self):
        self.count[...] += 1


def test_stateful_counter_from_spec():
    counter = Counter()
    counter()
    counter()
    assert int(counter.count[...]) == 2


# -- model surgery ----------------------------------------------------------------------------
class LoraParam(nnx.Param):
    pass


class LoraLinear(nnx.Module):
    def __init__(self, linear, rank):
        self.linear = linear
        self.A = LoraParam(jnp.ones((linear.din, rank)))
        self.B = LoraParam(jnp.ones((rank, linear.dout)))

    def __call__(self, x):
        return self.linear(x) + x @ self.A @ self.B


class MLP(nnx.Module):
    def __init__(self):
        self.linear1 = Linear(2, 3)
        self.linear2 = Linear(3, 2)

    def __call__(self, x):
        return self.linear2(self.linear1(x))


def test_model_surgery_lora_replacement():
    model = MLP()
    x = jnp.ones((1, 2))
    base = model(x)
    old = model.linear1
    model.linear1 = LoraLinear(model.linear1, 4)
    assert model.linear1.linear is old
    graphdef, lora, rest = nnx.split(model, LoraParam, ...)
    assert flat_paths(lora) == {("linear1", "A"), ("linear1", "B")}
    assert ("linear1", "linear", "w") in flat_paths(rest)
    merged = nnx.merge(graphdef, lora, rest)
    assert isinstance(merged.linear1, LoraLinear)
    h = old(x) + x @ jnp.ones((2, 4)) @ jnp.ones((4, 3))
    np.testing.assert_allclose(merged(x), model.linear2(h))
    assert not np.allclose(merged(x), base)


def test_model_surgery_share_add_delete_and_replace_variable():
    model = MLP()
    model.linear2 = model.linear1 = Linear(2, 2)  # share one module
    model.extra = Linear(2, 2)
    model.extra.w = model.linear1.w  # share one Variable
    _, state = nnx.split(model)
    paths = flat_paths(state)
    assert len(paths) == 3 and {("extra", "b"), ("linear1", "b")} < paths
    assert paths & {("extra", "w"), ("linear1", "w")}
    m2 = nnx.merge(*nnx.split(model))
    assert m2.linear1 is m2.linear2 and m2.extra.w is m2.linear1.w
    del model.extra
    model.linear1.b = Count(jnp.ones(2))
    _, params, counts = nnx.split(model, nnx.Param, Count)
    assert flat_paths(params) == {("linear1", "w")}
    assert flat_paths(counts) == {("linear1", "b")}


# -- iteration ------------------------------------------------------------------------------
def test_iter_modules_children_before_parent():
    m = Kinds()
    paths = [p for p, _ in m.iter_modules()]
    assert paths == [("layers", 0), ("layers", 1), ("pair", 0), ("sub",), ()]
    assert dict(m.iter_modules())[()] is m
    assert [p for p, _ in nnx.iter_modules(m)] == paths
    b = Block()
    b.again = b.linear  # shared modules are visited once, keys in sorted order
    assert [p for p, _ in b.iter_modules()] == [("again",), ("drop",), ("norm",), ()]


def test_iter_children():
    b = Block()
    b.v = nnx.Param(jnp.ones(1))
    b.items = [Linear(1, 1)]
    assert [k for k, _ in b.iter_children()] == ["drop", "linear", "norm", "v"]
    assert [k for k, _ in nnx.iter_children(b)] == ["drop", "linear", "norm", "v"]
    assert [k for k, _ in nnx.iter_module_children(b)] == ["drop", "linear", "norm"]


def test_iter_children_method_matches_function():
    b = Block()
    b.v = nnx.Param(jnp.ones(1))
    assert [k for k, _ in b.iter_children()] == [k for k, _ in nnx.iter_children(b)]


# -- set_attributes / train / eval ----------------------------------------------------------
def test_train_eval_and_set_attributes():
    m = nnx.Module()
    m.blocks = [Block(), Block()]
    m.eval()
    for b in m.blocks:
        assert b.drop.deterministic is True and b.norm.use_running_average is True
        assert not hasattr(b.linear, "deterministic")  # never added where absent
    m.train()
    assert all(b.drop.deterministic is False for b in m.blocks)
    assert all(b.norm.use_running_average is False for b in m.blocks)
    m.eval(rate=0.1)
    assert m.blocks[1].drop.rate == 0.1
    m.set_attributes(nnx.PathContains(0), deterministic=True, use_running_average=False)
    assert m.blocks[0].drop.deterministic is True and m.blocks[1].drop.deterministic is True
    m.train()
    m.set_attributes(nnx.PathContains(1), deterministic=True)
    assert m.blocks[0].drop.deterministic is False and m.blocks[1].drop.deterministic is True
    m.set_attributes(Normish, use_running_average=True)
    assert all(b.norm.use_running_average for b in m.blocks)
    with pytest.raises(ValueError, match="missing_attr"):
        m.set_attributes(missing_attr=1)
    m.set_attributes(missing_attr=1, raise_if_not_found=False)
    assert not any(hasattr(mod, "missing_attr") for _, mod in m.iter_modules())


def test_eval_changes_graphdef():
    m = Block()
    g_train = nnx.graphdef(m)
    m.eval()
    g_eval = nnx.graphdef(m)
    assert g_eval != g_train
    assert nnx.merge(g_eval, nnx.state(m)).drop.deterministic is True


# -- sow / perturb --------------------------------------------------------------------------
def test_sow_accumulates_tuples_and_custom_reduce():
    m = Linear(1, 1)
    assert m.sow(nnx.Intermediate, "seen", 1)
    m.sow(nnx.Intermediate, "seen", 2)
    assert type(m.seen) is nnx.Intermediate and m.seen[...] == (1, 2)
    m.sow(nnx.Intermediate, "acc", 1, reduce_fn=lambda a, b: a + b, init_fn=lambda: 10)
    m.sow(nnx.Intermediate, "acc", 5, reduce_fn=lambda a, b: a + b, init_fn=lambda: 10)
    assert m.acc[...] == 16
    m.sow("refax_test_sow_coll", "named", 1)
    assert nnx.variable_name_from_type(type(m.named)) == "refax_test_sow_coll"
    with pytest.raises(ValueError, match="w"):
        m.sow(nnx.Intermediate, "w", 1)
    inter = nnx.pop(m, nnx.Intermediate)
    assert flat_paths(inter) == {("seen",), ("acc",)} and not hasattr(m, "seen")


class Perturbed(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.array([1.0, 2.0]))

    def __call__(self, x):
        h = self.perturb("h", x * self.w)
        return (h**2).sum()


def test_perturb_gives_gradients_of_intermediates():
    m = Perturbed()
    x = jnp.array([3.0, 4.0])
    assert float(m(x)) == 9.0 + 64.0
    assert type(m.h) is nnx.Perturbation
    np.testing.assert_array_equal(m.h[...], [0.0, 0.0])
    graphdef, params, perts = nnx.split(m, nnx.Param, nnx.Perturbation)

    def loss(perts):
        return nnx.merge(graphdef, params, perts)(x)

    grads = jax.grad(loss)(perts)
    np.testing.assert_allclose(grads["h"][...], 2 * x * m.w[...])  # d(h^2)/dh
    m.h[...] = jnp.array([1.0, 1.0])
    assert float(m(x)) == 16.0 + 81.0


# -- copies, pickling -------------------------------------------------------------------------
def make_cyclic():
    m = Block()
    m.alias = m.linear
    m.me = m
    m.w_alias = m.linear.w
    m.linear.parent = m
    return m


@pytest.mark.parametrize("roundtrip", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_deepcopy_and_pickle_preserve_sharing_and_cycles(roundtrip):
    m = make_cyclic()
    c = roundtrip(m)
    assert c is not m and c.linear is not m.linear and c.linear.w is not m.linear.w
    assert c.alias is c.linear and c.me is c and c.linear.parent is c
    assert c.w_alias is c.linear.w
    assert nnx.graphdef(c) == nnx.graphdef(m)
    assert nnx.find_duplicates(c) == nnx.find_duplicates(m)
    np.testing.assert_array_equal(c.linear.w[...], m.linear.w[...])
    c.linear.w[...] = jnp.zeros((2, 2))
    assert float(m.linear.w[...].sum()) == 6.0
    c.size = 3  # the copy is a normal mutable object


def test_pickle_keeps_markers():
    m = nnx.Module()
    m.tags = nnx.static(("a", "b"))
    m.x = nnx.data(jnp.ones(1))
    c = pickle.loads(pickle.dumps(m))
    assert c._pytree__state.static_names == frozenset({"tags"})
    assert c._pytree__state.data_names == frozenset({"x"})


# -- tracing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Linear, lambda *a: Holder(*a)])
def test_trace_context_error_on_setattr_of_captured_module(cls):
    m = cls(1, 1)

    @jax.jit
    def setter(x):
        m.din = 5
        return x

    @jax.jit
    def deleter(x):
        del m.din
        return x

    for f in (setter, deleter):
        with pytest.raises(errors.TraceContextError) as info:
            f(1.0)
        assert str(info.value).startswith(f"Cannot mutate '{type(m).__name__}' from different")
        assert any("as an argument" in note for note in info.value.__notes__)
    assert m.din == 1


class Holder(nnx.Object):
    def __init__(self, din, dout):
        self.din = din
        self.lin = Linear(din, dout)


def test_modules_created_or_passed_inside_jit_are_mutable():
    @jax.jit
    def f(m, x):
        m.din = 3  # a fresh pytree copy made inside the trace
        local = Linear(1, 1)
        local.w[...] = x
        local.extra = x
        return m.w[...].sum() + local.w[...].sum() + m.din

    assert float(f(Linear(1, 2), jnp.ones((1, 1)))) == 1.0 + 1.0 + 3.0


# -- pytree-ness ------------------------------------------------------------------------------
def test_modules_are_pytrees():
    m = Linear(2, 2)
    leaves = jax.tree.leaves(m)
    assert len(leaves) == 2 and any(x is m.w[...] for x in leaves)
    m2 = jax.tree.map(lambda x: x + 1, m)
    assert type(m2) is Linear and m2 is not m and m2.din == 2
    assert type(m2.w) is nnx.Param and m2.w is not m.w
    np.testing.assert_array_equal(m2.w[...], m.w[...] + 1)
    out = jax.jit(lambda mod, x: mod(x))(m, jnp.ones((1, 2)))
    np.testing.assert_allclose(out, m(jnp.ones((1, 2))))
    nested = jax.tree.leaves(MLP())
    assert len(nested) == 4
    assert jax.tree.structure(Linear(2, 2)) == jax.tree.structure(m)
    assert jax.tree.structure(Linear(2, 3)) != jax.tree.structure(m)


def test_object_and_opt_out_are_not_pytrees():
    h = Holder(1, 1)
    assert jax.tree.leaves(h) == [h]
    with pytest.raises(TypeError):

        class Bad(nnx.Object, pytree=True):
            pass

    class Plain(nnx.Pytree, pytree=False):
        def __init__(self):
            self.w = nnx.Param(1.0)

    p = Plain()
    assert jax.tree.leaves(p) == [p]
    assert nnx.state(p)["w"] is p.w  # still a graph node


# -- data / static markers --------------------------------------------------------------------
class Box:
    def __init__(self, v):
        self.v = v


nnx.register_data_type(Box)


def test_static_marker_and_registered_data_type_in_pytree():
    m = nnx.Module()
    m.box = Box(1)
    m.frozen = nnx.static(Box(2))
    m.w = nnx.Param(jnp.ones(1))
    assert nnx.is_data(Box(0)) and not nnx.is_data(3) and nnx.is_data([1, jnp.ones(1)])
    leaves = jax.tree.leaves(m)
    assert any(x is m.box for x in leaves) and not any(x is m.frozen for x in leaves)
    assert m.frozen.v == 2  # the marker is unwrapped on assignment
    assert nnx.has_data({"a": jnp.ones(1), "b": 2})[0].shape == (1,)
    assert nnx.has_data((1, "x")) == []


def test_data_marker_python_scalar_pytree_leaf():
    m = nnx.Module()
    m.x = nnx.data(3.5)
    m.w = nnx.Param(jnp.ones(1))
    assert 3.5 in jax.tree.leaves(m)
    m.n = 3.5  # unmarked: static
    assert len(jax.tree.leaves(m)) == 2


def test_data_marker_survives_tree_map():
    m = nnx.Module()
    m.x = nnx.data(3.5)
    m2 = jax.tree.map(lambda v: v * 2, m)
    assert jax.tree.leaves(m2) == [7.0]


def test_data_marker_python_scalar_is_state():
    m = nnx.Module()
    m.x = nnx.data(3.5)
    _, state = nnx.split(m)
    assert flat_paths(state) == {("x",)}


def test_registered_data_type_is_state():
    m = nnx.Module()
    m.box = Box(1)
    _, state = nnx.split(m)
    assert state["box"] is m.box


def test_check_pytree():
    class Unhashable:
        __hash__ = None

    m = nnx.Module()
    m.ok = (1, 2)
    nnx.check_pytree(m)
    m.bad = Unhashable()
    with pytest.raises(TypeError, match="bad"):
        nnx.check_pytree(m)
    with pytest.raises(TypeError):
        nnx.check_pytree(3)


def test_oracle_state_paths_match_flax():
    flax_nnx = pytest.importorskip("flax.nnx")

    def build(lib):
        class Lin(lib.Module):
            def __init__(self, din, dout):
                self.w = lib.Param(jnp.ones((din, dout)))
                self.b = lib.Param(jnp.zeros(dout))
                self.din = din

        class Model(lib.Module):
            def __init__(self):
                self.count = lib.BatchStat(jnp.array(0))
                self.lin = Lin(2, 3)
                self.layers = lib.data([Lin(3, 3), Lin(3, 1)])
                self.table = lib.data({"a": lib.Intermediate(jnp.ones(1)), "z": Lin(1, 1)})
                self.arr = jnp.arange(3)
                self.name = "m"

        return Model()

    ours, theirs = build(nnx), build(flax_nnx)
    for filters in [(), (nnx.Param, ...), (nnx.BatchStat, nnx.Intermediate, ...)]:
        flax_filters = [
            getattr(flax_nnx, f.__name__) if isinstance(f, type) else f for f in filters
        ]
        a = nnx.split(ours, *filters)[1:]
        b = flax_nnx.split(theirs, *flax_filters)[1:]
        assert [flat_paths(s) for s in a] == [{p for p, _ in flax_nnx.to_flat_state(s)} for s in b]
    assert [p for p, _ in nnx.iter_modules(ours)] == [p for p, _ in flax_nnx.iter_modules(theirs)]
