"""Tests for the flatten cache (refax/_graph/_cache.py): a cached walk must never be stale."""

import collections
import copy
import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx
from refax._graph import _cache


class Count(nnx.Variable):
    pass


class Linear(nnx.Module):
    def __init__(self, din=2, dout=2):
        self.w = nnx.Param(jnp.ones((din, dout)))
        self.b = nnx.Param(jnp.zeros(dout))
        self.din = din


class Model(nnx.Module):
    def __init__(self):
        self.lin = Linear()
        self.layers = [Linear(), Linear()]
        self.table = {"stat": nnx.BatchStat(jnp.zeros(2)), "tagged": nnx.Param(1.0, tag="t")}
        self.count = Count(jnp.array(0))
        self.arr = jnp.arange(3.0)
        self.vars = [nnx.Param(jnp.array(0.0)), jnp.array(0.0)]


def flat(state):
    return list(nnx.to_flat_state(state))


def paths(state):
    return {p for p, _ in flat(state)}


def lookup(node, path):
    for key in path:
        node = getattr(node, key) if isinstance(node, nnx.Pytree) else node[key]
    return node


def signature(node):
    """An order-independent, uncached description of a graph (iter_graph sorts keys)."""
    out = []
    for path, v in nnx.iter_graph(node):
        if isinstance(v, nnx.Variable | jax.Array | np.ndarray):
            out.append((path, id(v)))
        elif isinstance(v, nnx.Pytree | list | tuple | dict):
            out.append((path, type(v)))
        else:
            out.append((path, v))
    return out


def assert_split_fresh(m, *filters):
    """split(m) describes m as it is now, and hands out m's own leaves."""
    g, *states = nnx.split(m, *filters)
    for s in states:
        for path, leaf in flat(s):
            assert leaf is lookup(m, path), path
    assert signature(nnx.merge(g, *states)) == signature(m)
    return g, states


# -- the flatten cache -----------------------------------------------------------------------
MUTATIONS = {
    "add_attr": lambda m: setattr(m, "new", nnx.Param(1.0)),
    "del_attr": lambda m: delattr(m, "count"),
    "list_append": lambda m: m.layers.append(Linear()),
    "list_pop": lambda m: m.layers.pop(),
    "list_replace": lambda m: m.layers.__setitem__(0, Linear(3, 3)),
    "list_reverse": lambda m: m.layers.reverse(),
    "dict_set": lambda m: m.table.__setitem__("z", Linear()),
    "dict_del": lambda m: m.table.pop("stat"),
    "replace_variable": lambda m: setattr(m.lin, "w", nnx.Param(jnp.zeros(1))),
    "variable_type": lambda m: setattr(m.lin, "w", nnx.BatchStat(m.lin.w[...])),
    "static_int": lambda m: setattr(m.lin, "din", 9),
    "static_in_list_module": lambda m: setattr(m.layers[1], "din", 9),
    "set_metadata": lambda m: m.lin.w.set_metadata(tag="x"),
    "metadata_attr": lambda m: setattr(m.lin.b, "tag", "y"),
    "del_metadata": lambda m: m.table["tagged"].del_metadata("tag"),
    "raw_array_rebind": lambda m: setattr(m, "arr", jnp.zeros(5)),
    "share_module": lambda m: setattr(m, "alias", m.layers[0]),
    "cycle": lambda m: setattr(m.layers[0], "parent", m),
    "nested_container": lambda m: setattr(m, "nest", {"l": [Linear()]}),
    "static_to_var": lambda m: setattr(m.lin, "din", nnx.Param(1.0)),
    "var_to_static": lambda m: setattr(m, "count", "gone"),
    "update_metadata": lambda m: nnx.update(m, {"count": Count(jnp.array(1), tag="u")}),
    "eval": lambda m: m.set_attributes(din=4),
    "sow": lambda m: m.sow(nnx.Intermediate, "seen", 1),
    "pop": lambda m: nnx.pop(m, nnx.BatchStat),
    "list_var_equal_value": lambda m: m.vars.__setitem__(0, nnx.BatchStat(jnp.array(0.0))),
    "list_array_equal_value": lambda m: m.vars.__setitem__(1, jnp.array(0, jnp.int32)),
    "dict_var_equal_value": lambda m: m.table.__setitem__("tagged", nnx.BatchStat(1.0)),
    "tuple_in_list": lambda m: m.layers.__setitem__(0, (Count(jnp.array(0)),)),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
@pytest.mark.parametrize("filters", [(), (nnx.Param, ...)], ids=["all", "filtered"])
def test_cache_sees_structural_changes(name, filters):
    m = Model()
    if name == "tuple_in_list":
        m.layers[0] = (Count(jnp.array(0)),)
    for _ in range(3):
        g_before, _ = assert_split_fresh(m, *filters)
    MUTATIONS[name](m)
    g_after, _ = assert_split_fresh(m, *filters)
    assert_split_fresh(m, *filters)
    if name not in (
        "list_reverse",
        "replace_variable",
        "raw_array_rebind",
        "list_array_equal_value",
        "tuple_in_list",
    ):
        assert g_after != g_before


@pytest.mark.parametrize(
    "make",
    [nnx.clone, copy.deepcopy, lambda m: nnx.merge(*nnx.split(m))],
    ids=["clone", "deepcopy", "merge"],
)
def test_cache_on_rebuilt_objects(make):
    m = make(Model())
    for mutate in (MUTATIONS["add_attr"], MUTATIONS["static_int"], MUTATIONS["list_append"]):
        nnx.split(m)
        nnx.split(m)
        mutate(m)
        assert_split_fresh(m)


def test_graphdef_of_copy_of_merged_object():
    c = nnx.clone(Model())
    assert nnx.graphdef(copy.deepcopy(c)) == nnx.graphdef(c)


def test_cache_sees_ordered_dict_mutation():
    m = nnx.Module()
    m.od = collections.OrderedDict(a=nnx.Param(jnp.ones(2)))
    nnx.split(m)
    nnx.split(m)
    m.od["b"] = nnx.Param(jnp.zeros(3))
    assert ("od", "b") in paths(nnx.split(m)[1])


def test_cache_value_changes_seen_without_rewalk():
    m = Model()
    g1, _ = nnx.split(m)
    g2, _ = nnx.split(m)
    m.lin.w[...] = jnp.full((2, 2), 5.0)
    m.count[...] += 1
    g3, s3 = nnx.split(m)
    assert g3 is g2 and g2 == g1  # the cached walk
    np.testing.assert_array_equal(s3["lin"]["w"][...], np.full((2, 2), 5.0))
    assert int(s3["count"][...]) == 1
    s3["lin"]["extra"] = nnx.Param(1.0)  # mutating a returned State never poisons the cache
    del s3["count"]
    _, s4 = nnx.split(m)
    assert "extra" not in s4["lin"] and s4["count"] is m.count


def test_cache_lookup_tolerates_concurrent_eviction(monkeypatch):
    m = Model()
    nnx.split(m)
    nnx.split(m)
    m.layers.append(Linear())

    def racing(entry, roots):
        _cache.clear(m)  # what another thread's lookup or eviction does in between
        return False

    monkeypatch.setattr(_cache.Entry, "valid", racing)
    nnx.split(m)


def test_cache_eviction_with_dying_roots():
    for _ in range(300):
        m = Linear()
        nnx.split(m)
        nnx.split(m)  # cached: the entry holds m
        nnx.split(m, nnx.Param, ...)  # placeholder entry, popped when m dies mid-eviction


def test_cache_does_not_keep_models_alive():
    m = Linear()
    nnx.split(m)
    nnx.split(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_split_from_threads():
    models = [Model() for _ in range(4)]
    expected = [(nnx.graphdef(m), paths(nnx.state(m))) for m in models]
    failures = []

    def work(i):
        try:
            for j in range(30):
                m = models[(i + j) % 4]
                g, s = nnx.split(m)
                if (g, paths(s)) != expected[(i + j) % 4] or s["lin"]["w"] is not m.lin.w:
                    failures.append((i, j))
                nnx.merge(g, s)
        except Exception as e:  # pragma: no cover - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# -- the stale cases of the cache issue, one by one (each gave a wrong answer before) ----------
def _jit_twice_then(m, f, mutate):
    jf = nnx.jit(f)
    jf(m)
    jf(m)  # kept walk in use
    mutate(m)
    return jf(m), f(m)


def test_renamed_key_of_a_registered_mapping_is_seen():
    m = nnx.Module()
    m.d = collections.OrderedDict(a=nnx.Param(jnp.ones(2)), b=nnx.Param(jnp.zeros(2)))
    nnx.split(m)
    nnx.split(m)
    nnx.jit(lambda m: None)(m)
    nnx.jit(lambda m: None)(m)

    def rename(m):
        m.d["z"] = m.d.pop("b")  # the same value objects in the same order, one key renamed

    got, want = _jit_twice_then(m, lambda m: {k: v[...] for k, v in m.d.items()}, rename)
    assert sorted(got) == sorted(want) == ["a", "z"]
    assert {p for p in paths(nnx.state(m))} == {("d", "a"), ("d", "z")}


def test_meta_field_of_a_registered_dataclass_is_seen_by_jit():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        scale: jax.Array
        mode: str

    jax.tree_util.register_dataclass(Cfg, data_fields=["scale"], meta_fields=["mode"])
    m = nnx.Module()
    m.cfg = Cfg(jnp.ones(2), "pos")

    def f(m):
        return m.cfg.scale * (1.0 if m.cfg.mode == "pos" else -1.0)

    def mutate(m):
        m.cfg.mode = "neg"

    got, want = _jit_twice_then(m, f, mutate)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, -np.ones(2))


def test_assignment_through_a_data_descriptor_is_seen_by_jit():
    class Positive:
        def __get__(self, obj, owner=None):
            return self if obj is None else obj.__dict__["_scale"]

        def __set__(self, obj, value):
            if value < 0:
                raise ValueError("scale must be >= 0")
            obj.__dict__["_scale"] = value

    class Scaled(nnx.Module):
        scale = Positive()

        def __init__(self):
            self.w = nnx.Param(jnp.ones(2))
            self.scale = 2.0

    def mutate(m):
        m.scale = 3.0

    got, want = _jit_twice_then(Scaled(), lambda m: m.w[...] * m.scale, mutate)
    np.testing.assert_array_equal(got, np.full(2, 3.0))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "write",
    [
        lambda m, v: vars(m).__setitem__("w", v),
        lambda m, v: object.__setattr__(m, "w", v),
        lambda m, v: m.__dict__.update(w=v),
    ],
    ids=["vars", "object.__setattr__", "__dict__.update"],
)
def test_writes_that_bypass_setattr_are_seen(write):
    m = Linear()
    nnx.split(m)
    nnx.split(m)
    new = nnx.Param(jnp.full((2, 2), 7.0))
    write(m, new)
    assert nnx.state(m)["w"] is new  # split sees the new Variable

    @nnx.jit
    def bump(m):
        m.w[...] += 1.0

    bump(m)
    bump(m)
    newer = nnx.Param(jnp.zeros((2, 2)))
    write(m, newer)
    bump(m)  # the update lands in the Variable the model holds now, not the detached one
    np.testing.assert_array_equal(m.w[...], np.ones((2, 2)))
    np.testing.assert_array_equal(new[...], np.full((2, 2), 9.0))


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s["lin"].__setitem__("extra", nnx.Param(1.0)),
        lambda s: s.lin.__setattr__("extra", nnx.Param(1.0)),
        lambda s: s.raw_mapping["lin"].__setitem__("extra", nnx.Param(1.0)),
        lambda s: nnx.State(s)["lin"].__setitem__("extra", nnx.Param(1.0)),
        lambda s: copy.copy(s)["lin"].__setitem__("extra", nnx.Param(1.0)),
        lambda s: s.replace_by_pure_dict({"arr": jnp.zeros(3)}),
        lambda s: s.__delitem__("lin"),
    ],
    ids=["item", "attr", "raw_mapping", "State()", "copy", "replace_by_pure_dict", "del"],
)
def test_states_from_a_kept_walk_are_copied_on_write(write):
    m = Model()
    nnx.split(m)
    nnx.split(m)
    _, state = nnx.split(m)  # served by the cache: shares its dicts until written to
    arr = m.arr
    write(state)
    _, fresh = nnx.split(m)
    assert "extra" not in fresh["lin"] and "lin" in fresh
    assert fresh["arr"] is arr and m.arr is arr
