"""A kept walk is never stale: random mutations through every Python route, then compare.

A hypothesis state machine builds a small model holding every kind of thing a walk goes
through (Modules, Variables, raw arrays, lists, dicts, tuples, an OrderedDict, a registered
dataclass with a static field, nnx.List / nnx.Dict, a data descriptor), mutates it through
every route Python offers (attribute protocol, descriptors, ``vars()`` writes,
``object.__setattr__``, ``__dict__.update``, container methods and rebuilds, pytree fields
and keys, Variable values, metadata and types, swaps, structural changes inside ``nnx.jit``),
and after every step checks that ``split``/``state``/``graphdef`` (served by the walk cache
from their second call on) and a jitted function (served by the lifting core's cache) give
what a cache-free walk and an eager run give.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from refax import nnx
from refax._graph import _cache
from refax._graph._flatten import flatten


class Positive:
    """A validating data descriptor that stores its value under another name."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj, value):
        if value < 0:
            raise ValueError("negative")
        obj.__dict__[self.slot] = value


@dataclasses.dataclass
class Cfg:
    x: jax.Array
    mode: str


jax.tree_util.register_dataclass(Cfg, data_fields=["x"], meta_fields=["mode"])


class Leaf(nnx.Module):
    scale = Positive()

    def __init__(self, k: int):
        self.w = nnx.Param(jnp.full((2,), float(k)))
        self.n = k
        self.scale = 1.0


class Root(nnx.Module):
    def __init__(self):
        self.a = Leaf(1)
        self.items = [Leaf(2), nnx.BatchStat(jnp.zeros(2))]
        self.table = {"x": Leaf(3), "c": nnx.Variable(jnp.array(0.0))}
        self.od = collections.OrderedDict(p=nnx.Param(jnp.ones(1)))
        self.cfg = Cfg(jnp.ones(2), "pos")
        self.tup = (nnx.Param(jnp.zeros(1)), 3)
        self.nl = nnx.List([Leaf(4)])
        self.nd = nnx.Dict(q=nnx.Param(jnp.ones(3)))
        self.raw = jnp.arange(2.0)


def describe(m) -> tuple:
    """A cache-free description of ``m``: its structure (every static value, type, key and
    sharing) as a checksum, and the sum of every leaf by path. Traceable."""
    walk = flatten(m, with_paths=True)
    signature = zlib.crc32(repr(walk.graphdef).encode())
    sums = {
        ".".join(map(str, p)): jnp.sum(jnp.asarray(getattr(leaf, "value", leaf)))
        for p, leaf in zip(walk.paths, walk.leaves)
    }
    return np.uint32(signature), sums


_jit_describe = nnx.jit(lambda m: describe(m))


def _objects(m) -> list:
    return [v for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Pytree)]


def _containers(m, kind) -> list:
    return [v for _, v in nnx.iter_graph(m) if type(v) is kind]


def _variables(m) -> list:
    return [v for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Variable)]


def _attr_names(obj) -> list:
    return [k for k in vars(obj) if k != "_pytree__state" and isinstance(k, str)]


def _new_value(data, k: int):
    """A value of any kind to store somewhere."""
    kind = data.draw(st.sampled_from(["param", "array", "int", "str", "leaf", "list", "none"]))
    return {
        "param": lambda: nnx.Param(jnp.full((1,), float(k))),
        "array": lambda: jnp.full((3,), float(k)),
        "int": lambda: k,
        "str": lambda: f"s{k}",
        "leaf": lambda: Leaf(k),
        "list": lambda: [nnx.Param(jnp.zeros(k % 3 + 1)), k],
        "none": lambda: None,
    }[kind]()


class CacheMachine(RuleBasedStateMachine):
    @initialize()
    def build(self):
        self.m = Root()
        self.k = 10

    def _fresh_k(self) -> int:
        self.k += 1
        return self.k

    # -- the attribute protocol and what bypasses it ---------------------------------------
    @rule(data=st.data())
    def set_attribute(self, data):
        obj = data.draw(st.sampled_from(_objects(self.m)))
        names = _attr_names(obj) + ["new_a", "new_b"]
        name = data.draw(st.sampled_from(names))
        value = _new_value(data, self._fresh_k())
        route = data.draw(st.sampled_from(["setattr", "vars", "object", "update"]))
        if isinstance(obj, (nnx.List, nnx.Dict)) and route == "setattr":
            route = "vars"
        if route == "setattr":
            setattr(obj, name, value)
        elif route == "vars":
            vars(obj)[name] = value
        elif route == "object":
            object.__setattr__(obj, name, value)
        else:
            obj.__dict__.update({name: value})

    @rule(data=st.data())
    def delete_attribute(self, data):
        obj = data.draw(st.sampled_from(_objects(self.m)))
        names = [n for n in _attr_names(obj) if n != "_scale"]
        if not names or obj is self.m and len(names) < 3:
            return
        name = data.draw(st.sampled_from(names))
        if data.draw(st.booleans()):
            delattr(obj, name)
        else:
            del vars(obj)[name]

    @rule(data=st.data())
    def rename_attribute(self, data):
        obj = data.draw(st.sampled_from(_objects(self.m)))
        names = _attr_names(obj)
        if not names:
            return
        old = data.draw(st.sampled_from(names))
        d = vars(obj)
        d[f"{old}_r{self._fresh_k()}"] = d.pop(old)

    @rule(data=st.data(), value=st.floats(0.0, 4.0))
    def set_through_descriptor(self, data, value):
        leaves = [o for o in _objects(self.m) if isinstance(o, Leaf) and "_scale" in vars(o)]
        if leaves:
            data.draw(st.sampled_from(leaves)).scale = value

    @rule(data=st.data())
    def share_or_cycle(self, data):
        objs = _objects(self.m)
        src, dst = data.draw(st.sampled_from(objs)), data.draw(st.sampled_from(objs))
        vars(src)[f"alias{self._fresh_k()}"] = dst

    # -- containers -------------------------------------------------------------------------
    @rule(data=st.data())
    def mutate_list(self, data):
        lists = _containers(self.m, list)
        if not lists:
            return
        lst = data.draw(st.sampled_from(lists))
        op = data.draw(st.sampled_from(["append", "pop", "set", "reverse", "insert"]))
        if op == "append":
            lst.append(_new_value(data, self._fresh_k()))
        elif op == "pop" and lst:
            lst.pop()
        elif op == "set" and lst:
            lst[data.draw(st.integers(0, len(lst) - 1))] = _new_value(data, self._fresh_k())
        elif op == "reverse":
            lst.reverse()
        elif op == "insert":
            lst.insert(0, _new_value(data, self._fresh_k()))

    @rule(data=st.data())
    def mutate_dict(self, data):
        dicts = _containers(self.m, dict)
        if not dicts:
            return
        d = data.draw(st.sampled_from(dicts))
        op = data.draw(st.sampled_from(["set", "del", "rename"]))
        keys = list(d)
        if op == "set" or not keys:
            d[data.draw(st.sampled_from([*keys, "k_new"]))] = _new_value(data, self._fresh_k())
        elif op == "del":
            del d[data.draw(st.sampled_from(keys))]
        else:
            old = data.draw(st.sampled_from(keys))
            d[f"{old}_r{self._fresh_k()}"] = d.pop(old)

    @rule(data=st.data())
    def rebuild_container(self, data):
        obj = data.draw(st.sampled_from(_objects(self.m)))
        names = [n for n in _attr_names(obj) if type(vars(obj)[n]) in (list, dict, tuple)]
        if not names:
            return
        name = data.draw(st.sampled_from(names))
        old = vars(obj)[name]
        if type(old) is tuple:
            new = (*old, _new_value(data, self._fresh_k()))
        elif type(old) is list:
            new = list(old)
        else:
            new = dict(old)
        vars(obj)[name] = new

    @rule(data=st.data())
    def mutate_pytrees(self, data):
        op = data.draw(st.sampled_from(["od_rename", "od_add", "cfg_mode", "cfg_x", "cfg_new"]))
        m = self.m
        if op.startswith("od") and isinstance(vars(m).get("od"), collections.OrderedDict):
            od = m.od
            if op == "od_rename" and od:
                old = next(iter(od))
                od[f"{old}_r{self._fresh_k()}"] = od.pop(old)
            else:
                od[f"o{self._fresh_k()}"] = nnx.Param(jnp.ones(2))
        elif op.startswith("cfg") and isinstance(vars(m).get("cfg"), Cfg):
            if op == "cfg_mode":
                m.cfg.mode = "neg" if m.cfg.mode == "pos" else "pos"
            elif op == "cfg_x":
                m.cfg.x = jnp.full((2,), float(self._fresh_k()))
            else:
                m.cfg = Cfg(m.cfg.x, m.cfg.mode)

    @rule(data=st.data())
    def mutate_nnx_containers(self, data):
        objs = [o for o in _objects(self.m) if isinstance(o, (nnx.List, nnx.Dict))]
        if not objs:
            return
        c = data.draw(st.sampled_from(objs))
        if isinstance(c, nnx.List):
            op = data.draw(st.sampled_from(["append", "pop", "set"]))
            if op == "append" or len(c) == 0:
                c.append(Leaf(self._fresh_k()))
            elif op == "pop":
                c.pop()
            else:
                c[0] = nnx.Param(jnp.ones(2))
        else:
            keys = list(c)
            if keys and data.draw(st.booleans()):
                del c[data.draw(st.sampled_from(keys))]
            else:
                c[f"d{self._fresh_k()}"] = nnx.Param(jnp.zeros(1))

    # -- Variables ------------------------------------------------------------------------
    @rule(data=st.data(), value=st.floats(-3.0, 3.0))
    def mutate_variable(self, data, value):
        variables = _variables(self.m)
        if not variables:
            return
        v = data.draw(st.sampled_from(variables))
        op = data.draw(st.sampled_from(["value", "metadata", "del_metadata", "type"]))
        if op == "value":
            v[...] = jnp.full(jnp.shape(v[...]), value, jnp.asarray(v[...]).dtype)
        elif op == "metadata":
            v.set_metadata(tag=f"t{self._fresh_k()}")
        elif op == "del_metadata" and v.has_metadata("tag"):
            v.del_metadata("tag")
        elif op == "type":
            new_type = nnx.BatchStat if type(v) is nnx.Param else nnx.Param
            object.__setattr__(v, "__class__", new_type)

    @rule(data=st.data())
    def swap_variables(self, data):
        owners = [(o, n) for o in _objects(self.m) for n in _attr_names(o)]
        owners = [(o, n) for o, n in owners if isinstance(vars(o)[n], nnx.Variable)]
        if len(owners) < 2:
            return
        (o1, n1), (o2, n2) = data.draw(st.lists(st.sampled_from(owners), min_size=2, max_size=2))
        d1, d2 = vars(o1), vars(o2)
        d1[n1], d2[n2] = d2[n2], d1[n1]

    # -- structural changes inside a transform ----------------------------------------------
    @rule(data=st.data())
    def change_inside_jit(self, data):
        objs = _objects(self.m)
        i = data.draw(st.integers(0, len(objs) - 1))
        op = data.draw(st.sampled_from(["add", "delete", "value"]))
        k = self._fresh_k()

        @nnx.jit
        def step(m):
            obj = _objects(m)[i]
            names = [n for n in _attr_names(obj) if n != "_scale"]
            if op == "add" or not names:
                vars(obj)[f"j{k}"] = nnx.Param(jnp.full((2,), float(k)))
            elif op == "delete" and obj is not m:
                del vars(obj)[names[0]]
            else:
                for v in _variables(m):
                    v[...] = v[...] + 1

        step(self.m)

    # -- the property ----------------------------------------------------------------------
    @invariant()
    def cached_walks_match_a_fresh_walk(self):
        m = self.m
        fresh = flatten(m, with_paths=True)
        expected = {p: id(leaf) for p, leaf in zip(fresh.paths, fresh.leaves)}
        for _ in range(2):  # the second call is served by the cache
            g, state = nnx.split(m)
            assert g == fresh.graphdef
            assert {p: id(leaf) for p, leaf in nnx.to_flat_state(state)} == expected
            assert nnx.graphdef(m) == fresh.graphdef
            params = nnx.state(m, nnx.Param)
            want = {p: i for (p, i), leaf in zip(expected.items(), fresh.leaves)}
            want = {p: i for p, i in want.items() if isinstance(_by_id(fresh, i), nnx.Param)}
            assert {p: id(leaf) for p, leaf in nnx.to_flat_state(params)} == want
        signature, sums = _jit_describe(m)
        eager_signature, eager_sums = describe(m)
        assert int(signature) == int(eager_signature)
        assert sums.keys() == eager_sums.keys()
        for key in sums:
            np.testing.assert_allclose(sums[key], eager_sums[key], err_msg=key)


def _by_id(walk, i):
    return next(leaf for leaf in walk.leaves if id(leaf) == i)


CacheMachine.TestCase.settings = settings(
    derandomize=True, max_examples=12, stateful_step_count=20, deadline=None
)
test_cache_never_stale = CacheMachine.TestCase


def test_cache_never_stale_with_the_python_comparison(monkeypatch):
    """The same machine with the pure-Python witness comparison (what runs where the C module
    ``_fastcheck`` was not built)."""
    monkeypatch.setattr(_cache, "_check", _cache._PyCheck)
    run_state_machine_as_test(CacheMachine, settings=CacheMachine.TestCase.settings)
