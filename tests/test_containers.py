import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx


def test_list_behaves_like_a_list_and_splits_with_int_paths():
    a, b, c = (nnx.Param(jnp.full((2,), float(i))) for i in range(3))
    layers = nnx.List([a, b])
    layers.append(c)
    assert len(layers) == 3 and layers[2] is c and list(layers) == [a, b, c]
    assert list(nnx.state(layers).keys()) == [0, 1, 2]
    del layers[0]
    assert list(layers) == [b, c]
    assert list(nnx.state(layers).keys()) == [0, 1]  # the cache saw the deletion
    layers.insert(0, a)
    layers[1:] = [c]
    assert list(layers) == [a, c]
    rebuilt = nnx.merge(*nnx.split(layers))
    assert isinstance(rebuilt, nnx.List) and len(rebuilt) == 2
    np.testing.assert_array_equal(rebuilt[1].value, c.value)


def test_list_round_trips_keep_length():
    layers = nnx.List([nnx.Param(jnp.ones(1)), 3])
    assert len(copy.deepcopy(layers)) == 2
    assert len(pickle.loads(pickle.dumps(layers))) == 2
    assert len(jax.tree.map(lambda x: x + 1, layers)) == 2


def test_dict_items_are_attributes():
    d = nnx.Dict(a=nnx.Param(jnp.ones(1)), b=3)
    assert d["a"] is d.a and d["b"] == 3 and set(d) == {"a", "b"} and len(d) == 2
    d["c"] = nnx.BatchStat(jnp.zeros(1))
    assert set(nnx.state(d).keys()) == {"a", "c"}
    del d["a"]
    assert "a" not in d
    with pytest.raises(KeyError):
        d["missing"]


def test_list_items_can_be_marked_data_or_static():
    ls = nnx.List([nnx.data(10), nnx.static("hello"), nnx.data(20), jnp.ones(1)])
    leaves, treedef = jax.tree.flatten(ls)
    assert leaves[:2] == [10, 20] and len(leaves) == 3
    back = jax.tree.unflatten(treedef, [x * 2 for x in leaves])
    assert back[0] == 20 and back[1] == "hello" and back[2] == 40
    out = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t))(ls)
    assert out[1] == "hello" and int(out[2]) == 21
    assert set(nnx.state(ls).keys()) == {0, 2, 3}


def test_list_marks_move_with_their_items():
    ls = nnx.List([nnx.static(1), nnx.data(2)])
    ls.insert(0, nnx.data(0))
    assert jax.tree.leaves(ls) == [0, 2]
    del ls[0]
    assert jax.tree.leaves(ls) == [2]
    ls[0] = 5  # an unmarked item replaces the marked one
    assert jax.tree.leaves(ls) == [2]
    ls[1:] = [nnx.static(7), nnx.data(8)]
    assert jax.tree.leaves(ls) == [8]
    ls.append(nnx.data(9))
    assert jax.tree.leaves(ls) == [8, 9] and list(ls) == [5, 7, 8, 9]
    assert nnx.state(ls).keys() == {2, 3}  # a kept walk sees the changed marks
    ls.append(nnx.static(10))
    assert nnx.state(ls).keys() == {2, 3}
    for copy_ in (copy.deepcopy(ls), pickle.loads(pickle.dumps(ls)), nnx.clone(ls)):
        assert jax.tree.leaves(copy_) == [8, 9]
    with pytest.raises(ValueError, match="Found data in value"):
        ls.append(nnx.static(jnp.ones(1)))
    assert len(ls) == 5


def test_list_and_dict_oracle_leaves_match_flax():
    flax_nnx = pytest.importorskip("flax.nnx")
    for lib in (nnx, flax_nnx):
        ls = lib.List([lib.data(jnp.array(1)), lib.static(100), lib.data(jnp.array(2))])
        ls.append(lib.data(3))
        d = lib.Dict({"b": lib.data(1), "a": 2, "c": jnp.ones(1)})
        leaves = [np.asarray(x).tolist() for x in jax.tree.leaves((ls, d))]
        if lib is nnx:
            ours = leaves
    assert ours == leaves
