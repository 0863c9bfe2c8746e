"""nnx.jit: forms, objects in/out, static args, caching, state and graph updates, trace errors,
donation, lowering, shardings; numbers checked against the oracle flax.nnx where semantics match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import refax
from refax import nnx
from tests._oracle import assert_trees_close, pure

TRACE_MSG = (
    "Cannot mutate Param from a different trace level "
    "(https://flax.readthedocs.io/en/latest/api_reference/flax.errors.html"
    "#flax.errors.TraceContextError)"
)
needs_8 = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


class Count(nnx.Variable):
    pass


class Counter(nnx.Module):
    def __init__(self, w=1.0):
        self.w = nnx.Param(jnp.array(w))
        self.count = Count(jnp.array(0))


class Parent(nnx.Module):
    def __init__(self, sub):
        self.sub = sub


def tick(c, x):
    c.count += 1
    return x


def bump(c, x):
    return c.w * tick(c, x)


# -- decorator forms and methods ----------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [lambda f: nnx.jit(f), lambda f: nnx.jit()(f), lambda f: nnx.jit(f, static_argnums=())],
    ids=["bare", "called", "function"],
)
def test_decorator_forms(make):
    f = make(bump)
    c = Counter(3.0)
    assert float(f(c, 2.0)) == 6.0 and float(f(c, 5.0)) == 15.0
    assert int(c.count.value) == 2 and f.__name__ == "bump"


class Stateful(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.array(3.0))
        self.count = Count(jnp.array(0))

    @nnx.jit
    def __call__(self, x):
        self.count += 1
        return self.w * x

    @nnx.jit(static_argnums=2)
    def scaled(self, x, k):
        self.count += k
        return self.w * x * k


def test_methods_decorated_in_class_body():
    m = Stateful()
    assert (float(m(2.0)), float(m(1.0)), int(m.count.value)) == (6.0, 3.0, 2)
    assert (float(m.scaled(1.0, 5)), int(m.count.value)) == (15.0, 7)
    assert (float(Stateful.scaled(m, 1.0, 2)), int(m.count.value)) == (6.0, 9)  # via the class
    with pytest.raises(ValueError, match="bound"):
        nnx.jit(nnx.Linear(2, 2, rngs=nnx.Rngs(0)).__call__)


# -- objects anywhere in the inputs and outputs -------------------------------------------
def test_objects_nested_in_args_kwargs_and_outputs():
    a, b = Counter(1.0), Counter(2.0)

    @nnx.jit
    def f(d, t, *, kw):
        d["a"].count += 1
        t[0].count += 10
        kw["m"].w.value = kw["m"].w.value + 1  # kw["m"] is d["a"]: one object
        new = Counter(5.0)
        return {"x": (d["a"], [new, t[1]]), "y": d["a"].w * 2}, kw["m"], new

    out, m, new = f({"a": a}, (b, 3.0), kw={"m": a})
    assert out["x"][0] is a and m is a
    assert out["x"][1][0] is new and isinstance(new, Counter)
    assert float(new.w.value) == 5.0 and isinstance(new.w.value, jax.Array)
    assert float(out["x"][1][1]) == 3.0 and float(out["y"]) == 4.0
    assert (int(a.count.value), int(b.count.value), float(a.w.value)) == (1, 10, 2.0)

    @nnx.jit
    def g(c):  # new objects that reference input nodes, returned several times
        h1, h2 = Parent(c.w), Parent(c)
        return h1, h2, (h1, [h2]), c.w, c.count

    h1, h2, (h1b, (h2b,)), w, count = g(a)
    assert h1.sub is a.w and h2.sub is a and h1b is h1 and h2b is h2
    assert w is a.w and count is a.count


def test_new_objects_match_eager_and_oracle():
    init = nnx.jit(lambda key: nnx.Linear(3, 4, rngs=nnx.Rngs(key)))
    f_init = F.jit(lambda key: F.Linear(3, 4, rngs=F.Rngs(key)))
    lin = init(jax.random.key(0))
    assert not isinstance(lin.kernel.value, jax.core.Tracer)
    assert_trees_close(pure(nnx, lin), pure(nnx, nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
    assert_trees_close(pure(nnx, lin), pure(F, f_init(jax.random.key(0))))
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(lin(x), f_init(jax.random.key(0))(x), rtol=1e-6)


# -- static arguments and compilation reuse -----------------------------------------------
def test_static_argnums_and_argnames():
    traces = []

    @nnx.jit(static_argnums=1, static_argnames="mode")
    def g(m, k, x, mode="a"):
        traces.append((k, mode))
        return m.w * k + x + (1 if mode == "a" else 2)

    c = Counter(1.0)
    assert float(g(c, 2, 1.0)) == 4.0
    assert float(g(c, 2, 5.0)) == 8.0  # traced value: no retrace
    assert float(g(c, 3, 1.0)) == 5.0  # new static value: retrace
    assert float(g(c, 3, 1.0, mode="b")) == 6.0
    assert traces == [(2, "a"), (3, "a"), (3, "b")]
    with pytest.raises(ValueError, match="hashable"):
        g(c, [1], 1.0)


def test_compilation_reuse():
    traces = []

    @nnx.jit
    def f(c, x):
        traces.append(1)
        c.count += 1
        return c.w * x

    c = Counter(1.0)
    f(c, 1.0)
    c.w.value = jnp.array(7.0)  # value change
    assert float(f(c, 2.0)) == 14.0
    assert float(f(Counter(2.0), 1.0)) == 2.0  # another object, same structure
    assert len(traces) == 1
    c.extra = nnx.Param(jnp.ones(2))  # structure change
    f(c, 1.0)
    assert len(traces) == 2
    c.w.value = jnp.ones(3)  # shape change
    f(c, 1.0)
    assert len(traces) == 3
    f(c, 1.0)
    assert len(traces) == 3 and int(c.count.value) == 5

    @nnx.jit
    def grow(c):  # changes the structure on its first call only: one retrace after it
        traces.append(2)
        if not hasattr(c, "extra2"):
            c.extra2 = nnx.Param(jnp.zeros(2))
        c.extra2.value = c.extra2.value + 1

    for _ in range(4):
        grow(c)
    assert traces.count(2) == 2
    np.testing.assert_array_equal(c.extra2.value, [4.0, 4.0])


# -- state propagation --------------------------------------------------------------------
def make_net(lib):
    class Net(lib.Module):
        def __init__(self, rngs):
            self.lin = lib.Linear(3, 4, rngs=rngs)
            self.bn = lib.BatchNorm(4, rngs=rngs)
            self.drop = lib.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    return Net(lib.Rngs(0, dropout=1))


def test_state_propagation_matches_oracle():
    x = jax.random.normal(jax.random.key(1), (5, 3))
    outs, states = {}, {}
    for lib in (nnx, F):
        net = make_net(lib)
        step = lib.jit(lambda n, x: n(x))
        outs[lib] = [np.asarray(step(net, x + i)) for i in range(3)]
        states[lib] = pure(lib, net)
    assert_trees_close(states[nnx], states[F])
    for a, b in zip(outs[nnx], outs[F]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(states[nnx]["drop"]["rngs"]["count"]) == 3
    assert np.abs(states[nnx]["bn"]["mean"]).sum() > 0
    # an Rngs argument: its counts advance and its keys are the oracle's
    r, fr = nnx.Rngs(0, dropout=1), F.Rngs(0, dropout=1)
    step = nnx.jit(lambda r, x: nnx.Dropout(0.5)(x, rngs=r))
    f_step = F.jit(lambda r, x: F.Dropout(0.5)(x, rngs=r))
    for _ in range(2):
        np.testing.assert_array_equal(step(r, jnp.ones(8)), f_step(fr, jnp.ones(8)))
    assert int(r.dropout.count.value) == 2 and int(r.default.count.value) == 0


def test_shared_module_in_two_arguments():
    a = Counter()
    two = nnx.jit(lambda x, y: (bump(x, 1.0), bump(y, 1.0), x is y)[2])
    assert bool(two(a, a)) and int(a.count.value) == 2

    s = Counter(1.0)
    p1, p2 = Parent(s), Parent(s)  # one submodule shared by two arguments

    @nnx.jit
    def f(p1, p2):
        p1.sub.w.value = p1.sub.w.value + 10
        return p1.sub is p2.sub, p2.sub.w.value

    same, seen = f(p1, p2)
    assert bool(same) and float(seen) == 11.0
    assert p1.sub is s and p2.sub is s and float(s.w.value) == 11.0


# -- graph updates ------------------------------------------------------------------------
def crazy_vector_dot(weights, x):
    weights.count[...] += 1
    y = x @ weights.kernel[...] + weights.bias[...]
    weights.some_property = ["a", 2, False]  # add attribute
    del weights.bias  # delete attribute
    weights.new_param = weights.kernel  # share reference
    return y


def make_weights(lib):
    class Weights(lib.Module):
        def __init__(self):
            self.kernel = lib.Param(jax.random.uniform(jax.random.key(0), (2, 3)))
            self.bias = lib.Param(jnp.ones(3))
            self.count = lib.Variable(jnp.array(0))

    return Weights()


def test_graph_updates_match_oracle():
    results = {}
    for lib in (nnx, F):
        w = make_weights(lib)
        kernel = w.kernel
        y = lib.jit(crazy_vector_dot)(w, jnp.ones(2))
        assert w.kernel is kernel and w.new_param is kernel
        assert not hasattr(w, "bias") and w.some_property == ["a", 2, False]
        results[lib] = (np.asarray(y), pure(lib, w))
    np.testing.assert_allclose(results[nnx][0], results[F][0], rtol=1e-6)
    assert_trees_close(results[nnx][1], results[F][1])
    assert set(results[nnx][1]) == {"kernel", "count"}  # new_param is an alias of kernel


def test_new_variable_and_new_shared_reference_inside():
    c, sub = Counter(2.0), Counter(5.0)
    c.sub = sub

    @nnx.jit
    def f(c):
        c.stat = nnx.BatchStat(jnp.array(5.0))
        c.alias = c.sub
        c.w.value = c.w.value * 10

    f(c)
    assert type(c.stat) is nnx.BatchStat and float(c.stat.value) == 5.0
    assert not isinstance(c.stat.value, jax.core.Tracer)
    assert c.alias is sub and c.sub is sub and float(c.w.value) == 20.0


def test_swap_variables_keeps_identity():
    def swap(c):
        c.w, c.v = c.v, c.w

    c = Counter(1.0)
    c.v = nnx.Param(jnp.array(2.0))
    w, v = c.w, c.v
    nnx.jit(swap)(c)
    assert c.w is v and c.v is w
    assert float(w.value) == 1.0 and float(v.value) == 2.0


def test_replaced_submodule_detaches_old_object():
    p = Parent(Counter(1.0))
    old = p.sub
    nnx.jit(lambda p: setattr(p, "sub", Counter(7.0)))(p)
    assert p.sub is not old
    assert float(old.w.value) == 1.0 and float(p.sub.w.value) == 7.0


class Raw(nnx.Module):
    def __init__(self):
        self.raw = jnp.array(1.0)
        self.l, self.d = [jnp.array(1.0)], {"a": jnp.array(1.0)}
        self.t = (jnp.array(1.0), jnp.array(2.0))


def test_raw_array_in_list_and_dict_updates_every_call():
    m, f = Raw(), nnx.jit(lambda m: m.l.__setitem__(0, m.l[0] * 2) or m.d.update(a=m.d["a"] * 3))
    for _ in range(3):
        f(m)
    assert float(m.l[0]) == 8.0 and float(m.d["a"]) == 27.0


def test_raw_array_attribute_updates_every_call():
    m, f = Raw(), nnx.jit(lambda m: setattr(m, "raw", m.raw * 2))
    seen = [float((f(m), m.raw)[1]) for _ in range(3)]
    assert seen == [2.0, 4.0, 8.0]


def test_tuple_of_arrays_attribute_reassigned_inside():
    m = Raw()
    nnx.jit(lambda m: setattr(m, "t", (m.t[0] + 1, m.t[1])))(m)
    assert float(m.t[0]) == 2.0 and float(m.t[1]) == 2.0


# -- trace-level errors -------------------------------------------------------------------
def test_closure_mutation_raises_trace_context_error():
    counter = Counter(0.0)

    @nnx.jit
    def f(x):
        counter.w += jnp.array(1)  # a Param of a module captured by closure
        return 2 * x

    with pytest.raises(refax.errors.TraceContextError) as e:
        f(3)
    assert str(e.value) == TRACE_MSG
    assert float(counter.w.value) == 0.0
    # reading a captured module is fine; mutating a captured Rngs is not
    lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 2))
    np.testing.assert_allclose(nnx.jit(lambda x: lin(x))(x), lin(x), rtol=1e-6)
    r = nnx.Rngs(0)
    with pytest.raises(refax.errors.TraceContextError, match="RngCount"):
        nnx.jit(lambda x: r())(1.0)


# -- donation, lowering -------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*donat")
def test_donate_argnums_donates_and_model_keeps_working():
    m, ref = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    k0, b0 = m.kernel.value, m.bias.value

    def step(m, x):
        m.kernel.value = m.kernel.value + 1
        m.bias.value = m.bias.value + 1
        return m(x)

    donated, plain = nnx.jit(step, donate_argnums=0), nnx.jit(step)
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(donated(m, x), plain(ref, x), rtol=1e-6)
    assert k0.is_deleted() and b0.is_deleted() and not x.is_deleted()
    assert not m.kernel.value.is_deleted()
    np.testing.assert_allclose(donated(m, x), plain(ref, x), rtol=1e-6)
    np.testing.assert_allclose(m(x), ref(x), rtol=1e-6)

    b1 = m.bias.value
    nnx.jit(lambda m, x: step(m, x), donate_argnames="m")(m=m, x=x)
    assert b1.is_deleted() and not m.bias.value.is_deleted()


@pytest.mark.filterwarnings("ignore:.*donat")
def test_donate_does_not_invalidate_unchanged_variables():
    m = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    m.count = nnx.Variable(jnp.array(0))
    # the output has the kernel's shape, so XLA can reuse the donated kernel buffer for it
    nnx.jit(lambda m, x: m(tick(m, x)) * 2, donate_argnums=0)(m, jnp.ones((4, 4)))
    assert not m.kernel.value.is_deleted()
    m(jnp.ones((1, 4)))


def test_lower_compile():
    c = Counter(2.0)
    f = nnx.jit(bump)
    compiled = f.lower(c, jnp.ones(1000)).compile()
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes >= 4000 and stats.output_size_in_bytes >= 4000
    assert int(c.count.value) == 0  # lowering does not run the function
    np.testing.assert_allclose(f(c, jnp.ones(3)), [2.0, 2.0, 2.0])


# -- shardings ----------------------------------------------------------------------------
class Sharded(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(128.0).reshape(16, 8))
        self.s = nnx.BatchStat(jnp.zeros((8,)))


MESHES = [pytest.param("auto", id="auto-mesh"), pytest.param("default", id="default-mesh")]


def make_mesh(kind):
    if kind == "auto":
        return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    return jax.make_mesh((8,), ("x",))


@needs_8
@pytest.mark.parametrize("kind", MESHES)
def test_state_sharding_in_shardings(kind):
    mesh = make_mesh(kind)
    m = Sharded()  # created outside the mesh: uncommitted single-device arrays
    with jax.set_mesh(mesh):
        ss = nnx.StateSharding(
            {nnx.Param: NamedSharding(mesh, P("x")), ...: NamedSharding(mesh, P())}
        )

        @nnx.jit(in_shardings=(ss, None))
        def f(m, x):
            m.w.value = m.w.value * 2
            m.s.value = m.s.value + 1
            return x + 1

        y = f(m, jnp.ones(3))
    # an Explicit mesh reshards, spelling the spec with trailing Nones: compare layouts
    assert m.w.value.sharding.is_equivalent_to(NamedSharding(mesh, P("x")), 2)
    assert m.s.value.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
    assert len(m.w.value.sharding.device_set) == 8
    np.testing.assert_allclose(m.w.value, 2 * np.arange(128.0).reshape(16, 8))
    np.testing.assert_allclose(y, [2.0, 2.0, 2.0])


@needs_8
@pytest.mark.parametrize("kind", MESHES)
def test_out_shardings_single_named_sharding(kind):
    mesh = make_mesh(kind)
    m = Sharded()
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m.w.value @ x, out_shardings=NamedSharding(mesh, P("x")))(
            m, jnp.ones(8)
        )
    assert out.sharding.spec == P("x") and len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, np.arange(128.0).reshape(16, 8).sum(1))


@needs_8
def test_out_shardings_with_scalar_state_update():
    mesh, c = make_mesh("auto"), Counter()
    with jax.set_mesh(mesh):
        h = nnx.jit(lambda c, x: tick(c, x) * 2, out_shardings=NamedSharding(mesh, P("x")))
        out = h(c, jnp.ones(16))
    assert out.sharding.spec == P("x") and int(c.count.value) == 1


def test_invalid_output_type_names_the_user_function_and_path():
    @nnx.jit
    def my_step(x):
        return {"loss": x.sum(), "name": "hello"}

    with pytest.raises(TypeError, match=r"my_step at .*test_jit\.py:\d+.*str at output \['name'\]"):
        my_step(jnp.ones(3))

    with pytest.raises(TypeError, match=r"<lambda>.*nnx\.vmap.*output \[1\]"):
        nnx.vmap(lambda x: (x, "s"))(jnp.ones((2, 3)))
