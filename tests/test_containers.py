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
