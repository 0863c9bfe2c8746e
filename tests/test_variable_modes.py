"""Variable modes (ref / hijax), var_defaults, with_vars, hooks and axis callbacks, SplitBackups,
traversals and ids: the Variable-side surface that reference code relies on."""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx
from refax.nnx import ids, traversals


# -- ref / hijax modes ---------------------------------------------------------------------------
def test_ref_mode_hands_out_a_jax_ref_and_plain_jit_writes_into_it():
    v = nnx.Variable(jnp.arange(3.0), ref=True)
    assert isinstance(v.get_raw_value(), jax.Ref)

    @jax.jit
    def scale(v):
        v[...] = v[...] * 2

    scale(v)
    scale(v)
    np.testing.assert_allclose(v[...], [0.0, 4.0, 8.0])


def test_hijax_mode_keeps_plain_raw_values_and_still_mutates_under_jit():
    v = nnx.Param(jnp.ones(2), hijax=True)
    assert not isinstance(v.get_raw_value(), jax.Ref)

    @jax.jit
    def bump(v):
        v[...] += 1

    bump(v)
    np.testing.assert_allclose(v[...], [2.0, 2.0])
    # Outside any trace a write of a new shape makes new references.
    v.value = jnp.zeros((4,))
    assert v.shape == (4,)
    v[...] = 7.0  # an indexed write goes into the references (broadcast to their shape)
    np.testing.assert_allclose(v[...], np.full(4, 7.0))


def test_a_ref_cannot_be_the_value_of_a_variable():
    with pytest.raises(ValueError, match="ref=True"):
        nnx.Variable(jax.new_ref(jnp.zeros(2)))


def test_var_defaults_context_manager_and_decorator_restore_the_defaults():
    assert nnx.var_defaults() == {"hijax": False, "ref": False}
    with nnx.var_defaults(ref=True):
        assert nnx.Param(1.0).ref
        assert nnx.var_defaults().ref
    assert not nnx.Param(1.0).ref

    @nnx.var_defaults(hijax=True)
    def make():
        return nnx.Param(0.0)

    assert make().hijax and not nnx.var_defaults().hijax
    with pytest.raises(TypeError, match="bool"):
        nnx.var_defaults(ref=1)


def test_with_vars_converts_only_selected_variables_and_keeps_the_rest():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    converted = nnx.with_vars(model, ref=True, only=nnx.Param)
    assert converted is not model
    assert converted.kernel.ref and not model.kernel.ref
    np.testing.assert_allclose(converted.kernel[...], model.kernel[...])
    back = nnx.with_vars(converted, ref=False)
    assert not back.kernel.ref
    x = jnp.ones((1, 2))
    np.testing.assert_allclose(back(x), model(x), rtol=1e-6)


def test_with_vars_refuses_to_split_a_shared_variable_unless_allowed():
    shared = nnx.Param(jnp.ones(2))
    tree = {"a": shared, "b": shared}
    with pytest.raises(ValueError, match="a\n  b"):
        nnx.with_vars(tree, hijax=True)
    out = nnx.with_vars(tree, hijax=True, allow_duplicates=True)
    assert out["a"].hijax and out["a"] is out["b"] and out["a"] is not shared


def test_vars_as_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="with_vars"):
        v = nnx.vars_as(nnx.Param(1.0), ref=True)
    assert v.ref


# -- customising access: overrides and hooks ------------------------------------------------------
class Doubling(nnx.Variable):
    """Reads return twice the stored value."""

    def get_value(self, index=None):
        value = super().get_value() if index is None else super().get_value(index)
        return value * 2


def test_get_value_override_applies_to_every_read():
    v = Doubling(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(v[...], [2.0, 4.0])
    np.testing.assert_allclose(v.value, [2.0, 4.0])
    np.testing.assert_allclose(v + 1, [3.0, 5.0])
    np.testing.assert_allclose(v.get_raw_value(), [1.0, 2.0])


def test_metadata_hooks_run_on_create_set_and_get():
    calls = []

    def on_set(var, value):
        calls.append(("set", float(value)))
        return value + 10

    def on_get(var, value):
        return value * 3

    def on_create(var, value):
        calls.append(("create", float(value)))
        return value + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        v = nnx.Variable(
            jnp.array(1.0), on_set_value=on_set, on_get_value=on_get, on_create_value=on_create
        )
    assert float(v.get_raw_value()) == 2.0  # created: 1 + 1
    assert float(v[...]) == 6.0  # read: 2 * 3
    v[...] = jnp.array(5.0)
    assert float(v.get_raw_value()) == 15.0
    assert calls == [("create", 1.0), ("set", 5.0)]


def test_add_axis_and_remove_axis_run_under_vmap():
    seen = []

    class Tracked(nnx.Variable):
        def add_axis(self, axis_index, axis_name):
            seen.append(("add", axis_index, axis_name))

        def remove_axis(self, axis_index, axis_name):
            seen.append(("remove", axis_index, axis_name))

    class M(nnx.Module):
        def __init__(self):
            self.w = Tracked(jnp.zeros(3))

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "b"})
    def run(m):
        return m.w[...] + 1

    out = run(M())
    np.testing.assert_allclose(out, np.ones(3))
    assert ("remove", 0, "b") in seen and ("add", 0, "b") in seen


def test_to_state_and_copy_keep_the_type_and_metadata():
    p = nnx.Param(jnp.ones(2), tag="w")
    s = p.to_state()
    assert type(s) is nnx.Param and s.tag == "w" and s is not p
    c = p.copy(jnp.zeros(2), tag="z")
    assert c.tag == "z" and p.tag == "w"
    np.testing.assert_allclose(c[...], [0.0, 0.0])


# -- SplitBackups ------------------------------------------------------------------------------
def test_split_backups_restore_and_are_immutable_pytrees():
    rngs = nnx.Rngs(0, dropout=1)
    before = jax.random.key_data(rngs.default.key[...])
    with nnx.split_rngs(rngs, splits=4) as backups:
        assert rngs.default.key.shape == (4,)
        assert len(backups) == 2
        with pytest.raises(AttributeError, match="immutable"):
            backups.backups = []
        leaves = jax.tree.leaves(backups)
        assert leaves  # streams' and saved arrays are leaves
    assert rngs.default.key.shape == ()
    np.testing.assert_array_equal(jax.random.key_data(rngs.default.key[...]), before)


# -- traversals and ids ---------------------------------------------------------------------------
def test_flatten_mapping_round_trips_and_keeps_empty_nodes():
    tree = {"a": {"b": 1, "c": {}}, "d": 2}
    flat = traversals.flatten_mapping(tree)
    assert flat == {("a", "b"): 1, ("d",): 2}
    flat_empty = traversals.flatten_mapping(tree, keep_empty_nodes=True)
    assert flat_empty[("a", "c")] is traversals.empty_node
    assert traversals.unflatten_mapping(flat_empty) == tree
    flat_sep = traversals.flatten_mapping(tree, sep="/")
    assert flat_sep == {"a/b": 1, "d": 2}
    assert traversals.unflatten_mapping(flat_sep, sep="/") == {"a": {"b": 1}, "d": 2}


def test_uuids_are_unique_and_copies_get_fresh_ones():
    a, b = ids.uuid(), ids.uuid()
    assert a != b and a == ids.UUID(a.id) and hash(a) == hash(ids.UUID(a.id))
    assert copy.copy(a) != a and copy.deepcopy(a) != a
