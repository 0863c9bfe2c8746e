"""split_rngs / fork_rngs / with_rngs: the three forms restore the streams, counts advance and
keys agree with the oracle flax.nnx, ``only=`` filters, and the transforms.md noise examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random

import refax as nnx


def _kd(key):
    return np.asarray(random.key_data(key))


def _stream_state(rngs, *names):
    return {n: (_kd(rngs[n].key[...]), np.asarray(rngs[n].count[...])) for n in names}


def _split_rngs_trace(lib):
    """Keys and counts seen through every form of split_rngs / fork_rngs."""
    out = {}
    rngs = lib.Rngs(params=0, dropout=1)

    @lib.split_rngs(splits=4)
    def inside(rngs):
        return _kd(rngs.params.key[...]), _kd(rngs.dropout.key[...]), rngs.params.count[...]

    out["decorator"] = inside(rngs)
    out["after_decorator"] = _stream_state(rngs, "params", "dropout")
    with lib.split_rngs(rngs, splits=(2, 3), only="dropout"):
        out["context"] = _stream_state(rngs, "params", "dropout")
    out["after_context"] = _stream_state(rngs, "params", "dropout")
    backups = lib.split_rngs(rngs, splits=5, only=lib.PathContains("params"))
    out["function"] = _stream_state(rngs, "params", "dropout")
    lib.restore_rngs(backups)
    out["after_function"] = _stream_state(rngs, "params", "dropout")
    with lib.split_rngs(rngs, splits=1, squeeze=True):
        out["squeeze"] = _stream_state(rngs, "params")
    with lib.fork_rngs(rngs):
        out["fork"] = _stream_state(rngs, "params", "dropout")
    with lib.fork_rngs(rngs, split={"params": 2}):
        out["fork_split"] = _stream_state(rngs, "params", "dropout")
    out["end"] = _stream_state(rngs, "params", "dropout")
    return out


def test_split_and_fork_forms_match_oracle():
    ours = _split_rngs_trace(nnx)
    theirs = _split_rngs_trace(pytest.importorskip("flax.nnx"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        a, b = jax.tree.leaves(ours[k]), jax.tree.leaves(theirs[k])
        assert len(a) == len(b), k
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=k)


def test_decorator_restores_keys_and_advances_counts_by_one():
    rngs = nnx.Rngs(params=0, dropout=1)
    key0 = _kd(rngs.params.key[...])

    @nnx.split_rngs(splits=3)
    def f(rngs):
        assert rngs.params.key.shape == (3,) and rngs.dropout.key.shape == (3,)
        assert rngs.params.count.shape == (3,)
        np.testing.assert_array_equal(rngs.params.count[...], 0)
        return _kd(rngs.params.key[...])

    keys = f(rngs)
    np.testing.assert_array_equal(keys, _kd(random.split(random.fold_in(random.key(0), 0), 3)))
    np.testing.assert_array_equal(_kd(rngs.params.key[...]), key0)
    assert int(rngs.params.count[...]) == int(rngs.dropout.count[...]) == 1
    f(rngs)
    assert int(rngs.params.count[...]) == 2


def test_restored_even_when_the_function_raises():
    rngs = nnx.Rngs(0)

    @nnx.split_rngs(splits=2)
    def boom(rngs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        boom(rngs)
    assert rngs.default.key.shape == () and int(rngs.default.count[...]) == 1


@pytest.mark.parametrize(
    "only, split_names",
    [
        ("dropout", {"dropout"}),
        (nnx.Not("dropout"), {"params"}),
        (nnx.PathContains("params"), {"params"}),
        (nnx.RngState, {"params", "dropout"}),
        (..., {"params", "dropout"}),
        (nnx.Nothing, set()),
    ],
)
def test_only_filter_selects_streams(only, split_names):
    rngs = nnx.Rngs(params=0, dropout=1)
    with nnx.split_rngs(rngs, splits=2, only=only):
        split = {n for n in ("params", "dropout") if rngs[n].key.shape == (2,)}
    assert split == split_names
    assert {n for n in ("params", "dropout") if int(rngs[n].count[...]) == 1} == split_names


def test_fork_rngs_mapping_first_match_wins():
    rngs = nnx.Rngs(params=0, dropout=1, noise=2)
    with nnx.fork_rngs(rngs, split={"params": 2, "noise": None}):
        shapes = {n: rngs[n].key.shape for n in ("params", "dropout", "noise")}
    assert shapes == {"params": (2,), "dropout": (), "noise": ()}
    counts = {n: int(rngs[n].count[...]) for n in ("params", "dropout", "noise")}
    assert counts == {"params": 1, "dropout": 0, "noise": 1}  # dropout untouched
    with nnx.fork_rngs(rngs, split={"params": 3, ...: None}):  # `...` catches the rest
        assert rngs.params.key.shape == (3,) and rngs.dropout.key.shape == ()
    assert int(rngs.dropout.count[...]) == 1


def test_squeeze_needs_a_single_split():
    with pytest.raises(ValueError, match="squeeze=True"):
        nnx.split_rngs(nnx.Rngs(0), splits=2, squeeze=True)


def test_streams_inside_modules_and_shared_streams_split_once():
    rngs = nnx.Rngs(dropout=3)
    a = nnx.Dropout(0.5, rngs=rngs)
    pair = [a, a]  # the same stream reached twice
    with nnx.split_rngs(pair, splits=4):
        assert a.rngs.key.shape == (4,)
    assert a.rngs.key.shape == () and int(a.rngs.count[...]) == 1


# -- with vmap -------------------------------------------------------------------------------
def _dropout_lanes(lib):
    model = lib.Dropout(0.5, rngs=lib.Rngs(dropout=3))

    @lib.split_rngs(splits=4)
    @lib.vmap(in_axes=(0, None))
    def drop(m, x):
        return m(x)

    first, second = drop(model, jnp.ones(8)), drop(model, jnp.ones(8))
    return np.asarray(first), np.asarray(second), int(model.rngs.count[...])


def test_dropout_lanes_match_oracle():
    first, second, count = _dropout_lanes(nnx)
    assert first.shape == (4, 8) and count == 2
    assert not np.array_equal(first[0], first[1])  # each lane has its own key
    assert not np.array_equal(first, second)  # the stream advanced between calls
    ref = _dropout_lanes(pytest.importorskip("flax.nnx"))
    np.testing.assert_array_equal(first, ref[0])
    np.testing.assert_array_equal(second, ref[1])


class Count(nnx.Variable):
    pass


class Weights(nnx.Module):
    def __init__(self, kernel, bias, count, seed):
        self.kernel, self.bias = nnx.Param(kernel), nnx.Param(bias)
        self.count = Count(count)
        self.rngs = nnx.Rngs(noise=seed)


def _noisy_vector_dot(weights, x):
    weights.count += 1
    y = x @ weights.kernel + weights.bias
    return y + random.normal(weights.rngs.noise(), y.shape)


def test_noisy_vector_dot_presplit_keys_prints_false():
    weights = Weights(
        random.uniform(random.key(0), (2, 3)),
        jnp.zeros((3,)),
        jnp.array(0),
        random.split(random.key(0), num=10),
    )
    x = random.normal(random.key(1), (10, 2))
    state_axes = nnx.StateAxes({nnx.RngState: 0, (nnx.Param, Count): None})
    y1 = nnx.vmap(_noisy_vector_dot, in_axes=(state_axes, 0))(weights, x)
    y2 = nnx.vmap(_noisy_vector_dot, in_axes=(state_axes, 0))(weights, x)
    assert not bool(jnp.allclose(y1, y2))
    assert int(weights.count[...]) == 2
    np.testing.assert_array_equal(weights.rngs.noise.count[...], 2 * np.ones(10))


def test_noisy_vector_dot_with_split_rngs_prints_false():
    weights = Weights(random.uniform(random.key(0), (2, 3)), jnp.zeros((3,)), jnp.array(0), 0)
    x = random.normal(random.key(1), (10, 2))
    state_axes = nnx.StateAxes({nnx.RngState: 0, (nnx.Param, Count): None})
    noisy = nnx.split_rngs(splits=10)(nnx.vmap(_noisy_vector_dot, in_axes=(state_axes, 0)))
    y1, y2 = noisy(weights, x), noisy(weights, x)
    assert y1.shape == (10, 3)
    assert not bool(jnp.allclose(y1, y2))
    assert weights.rngs.noise.key.shape == ()  # lowered back: usable outside
    assert int(weights.rngs.noise.count[...]) == 2 and int(weights.count[...]) == 2
    # the lane keys are the oracle's: split(fold_in(key(0), n), 10)
    lane_keys = random.split(random.fold_in(random.key(0), 0), 10)
    y = x @ weights.kernel.value + jax.vmap(lambda k: random.normal(random.fold_in(k, 0), (3,)))(
        lane_keys
    )
    np.testing.assert_allclose(y1, y, rtol=1e-5, atol=1e-6)


# -- with_rngs -------------------------------------------------------------------------------
def _with_rngs_trace(lib, **kw):
    out = {}
    r = lib.Rngs(params=0, dropout=1, noise=2)
    n = lib.with_rngs(r, split={"params": 4, ...: (2, 4)}, **kw)
    out["split"] = _stream_state(n, "params", "dropout", "noise")
    n = lib.with_rngs(r, split={"params": 4}, fork=lib.Not("params"), **kw)
    out["fork"] = _stream_state(n, "params", "dropout", "noise")
    n = lib.with_rngs(r, broadcast=3, only="noise", **kw)
    out["broadcast"] = _stream_state(n, "params", "dropout", "noise")
    out["original"] = _stream_state(r, "params", "dropout", "noise")
    return out


def test_with_rngs_matches_oracle():
    ours = _with_rngs_trace(nnx)
    theirs = _with_rngs_trace(pytest.importorskip("flax.nnx"), graph=False)
    for k in ours:
        a, b = jax.tree.leaves(ours[k]), jax.tree.leaves(theirs[k])
        assert len(a) == len(b), k
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=k)


def test_with_rngs_returns_a_copy_and_rejects_conflicting_rules():
    r = nnx.Rngs(params=0)
    n = nnx.with_rngs(r, split=2)
    assert n is not r and n.params.key.shape == (2,) and r.params.key.shape == ()
    with pytest.raises(ValueError, match="matches multiple rules"):
        nnx.with_rngs(r, split={"params": 4}, fork="params")

    @nnx.with_rngs(split=3)
    def shapes(rngs):
        return rngs.params.key.shape

    assert shapes(r) == (3,) and r.params.key.shape == ()
