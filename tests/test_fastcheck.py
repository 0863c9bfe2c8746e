"""The walk cache's witness comparison: the C module ``_fastcheck`` and its pure-Python twin
(``_cache._PyCheck``) give the same answer on every input, including the ways a check must
fail (a value replaced, an item added or removed, a length that no longer adds up)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refax._graph import _cache

C = _cache._C_CHECK
PY = _cache._PyCheck
needs_c = pytest.mark.skipif(C is None, reason="the C module _fastcheck is not built")


class Obj:
    pass


POOL = [object() for _ in range(6)]
KEYS = ["a", "b", "c", "d", "e"]


def make(values: list[list[int]]) -> tuple[tuple, tuple]:
    """Objects whose __dict__ values are POOL items, and the expected tuple (closed by _END)."""
    objs = []
    for vals in values:
        o = Obj()
        for k, v in zip(KEYS, vals):
            setattr(o, k, POOL[v])
        objs.append(o)
    expected = (*(POOL[v] for vals in values for v in vals), _cache._END)
    return tuple(objs), expected


def mutate(d: dict, what: str) -> bool:
    """One write to ``d`` (a ``__dict__`` or a plain dict); whether anything changed."""
    if what == "add":
        d["z"] = POOL[0]
        return True
    if not d or what == "same":
        return False
    k = next(iter(d))
    if what == "replace":
        d[k] = object()
    elif what == "delete":
        del d[k]
    elif what == "rename":
        d["z"] = d.pop(k)
    return True


objects = st.lists(st.lists(st.integers(0, 5), max_size=5), max_size=4)


@needs_c
def test_the_c_module_is_the_one_in_use():
    assert _cache._check is C


@needs_c
@settings(max_examples=200, deadline=None)
@given(objects, st.data())
def test_values_are_agree(values, data):
    objs, expected = make(values)
    for impl in (C, PY):
        assert impl.values_are(objs, expected, len(expected) - 1)
    # one mutation through the instance dict: replace, add or delete a value
    if objs:
        o = objs[data.draw(st.integers(0, len(objs) - 1))]
        changed = mutate(vars(o), data.draw(st.sampled_from(["replace", "add", "delete", "same"])))
        assert C.values_are(objs, expected, len(expected) - 1) == PY.values_are(
            objs, expected, len(expected) - 1
        )
        if changed:
            assert not C.values_are(objs, expected, len(expected) - 1)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(KEYS), st.integers(0, 5)), max_size=4), st.data())
def test_items_are_agree(dicts, data):
    dicts = tuple({k: POOL[v] for k, v in d.items()} for d in dicts)
    lens = tuple(map(len, dicts))
    keys = tuple(k for d in dicts for k in d)
    vals = tuple(v for d in dicts for v in d.values())
    for impl in (C, PY):
        assert impl.items_are(dicts, lens, keys, vals)
    if dicts:
        d = dicts[data.draw(st.integers(0, len(dicts) - 1))]
        changed = mutate(d, data.draw(st.sampled_from(["replace", "add", "delete", "rename"])))
        assert C.items_are(dicts, lens, keys, vals) == PY.items_are(dicts, lens, keys, vals)
        if changed:
            assert not C.items_are(dicts, lens, keys, vals)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=4), max_size=4), st.data())
def test_list_items_are_agree(lists, data):
    lists = tuple([POOL[v] for v in items] for items in lists)
    lens = tuple(map(len, lists))
    items = tuple(x for lst in lists for x in lst)
    for impl in (C, PY):
        assert impl.list_items_are(lists, lens, items)
    if lists:
        lst = lists[data.draw(st.integers(0, len(lists) - 1))]
        what = data.draw(st.sampled_from(["replace", "append", "pop", "move"]))
        if what == "replace" and lst:
            lst[0] = object()
        elif what == "append":
            lst.append(POOL[0])
        elif what == "pop" and lst:
            lst.pop()
        elif what == "move" and len(lists) > 1 and lst:
            other = lists[0] if lst is not lists[0] else lists[1]
            other.append(lst.pop())
        assert C.list_items_are(lists, lens, items) == PY.list_items_are(lists, lens, items)


@needs_c
def test_roots_are_skip_only_the_bookkeeping_position():
    o = Obj()
    o.a, o.b, o.c = POOL[0], POOL[1], POOL[2]
    keys = tuple(vars(o))
    check = ((0, Obj, keys, 1, (POOL[0], POOL[2])),)  # position 1 is not compared
    for impl in (C, PY):
        assert impl.roots_are((o,), check)
    o.b = object()
    for impl in (C, PY):
        assert impl.roots_are((o,), check)
    o.c = object()
    for impl in (C, PY):
        assert not impl.roots_are((o,), check)
    o.c = POOL[2]
    o.d = POOL[3]  # a key added
    for impl in (C, PY):
        assert not impl.roots_are((o,), check)
    del o.d
    vars(o)["z"] = vars(o).pop("a")  # a key renamed
    for impl in (C, PY):
        assert not impl.roots_are((o,), check)


@needs_c
def test_types_are_and_errors():
    xs = [1, "a", None]
    types = (int, str, type(None))
    assert C.types_are(xs, types) and PY.types_are(xs, types)
    assert not C.types_are(xs, types[:2]) and not PY.types_are(xs, types[:2])
    assert not C.types_are([1.0, "a", None], types)
    with pytest.raises(TypeError):
        C.types_are(xs, list(types))
    with pytest.raises(TypeError):
        C.values_are((object(),), (), 0)  # no __dict__, as vars() would say


@needs_c
@settings(max_examples=100, deadline=None)
@given(objects, st.lists(st.lists(st.integers(0, 5), max_size=3), max_size=3), st.data())
def test_witness_is_agrees_after_a_mutation(values, lists, data):
    """The one-call comparison ``Entry.valid`` makes: both versions agree before and after one
    write to an object, a list or a leaf list."""
    objs, expected = make(values)
    types = tuple(map(type, objs))
    lists = tuple([POOL[v] for v in items] for items in lists)
    leaves = [1, "x"]
    args = [
        (),
        (),
        objs,
        types,
        expected,
        len(expected) - 1,
        leaves,
        (int, str),
        lists,
        tuple(map(len, lists)),
        tuple(x for lst in lists for x in lst),
        (),
        (),
        (),
        (),
    ]
    assert C.witness_is(*args) and PY.witness_is(*args)
    what = data.draw(st.sampled_from(["object", "list", "leaf"]))
    if what == "object" and objs:
        vars(objs[0])["z"] = POOL[0]
    elif what == "list" and lists:
        lists[0].append(POOL[0])
    elif what == "leaf":
        leaves[0] = 1.0
    assert C.witness_is(*args) == PY.witness_is(*args)
