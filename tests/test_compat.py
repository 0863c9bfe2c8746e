"""nnx.compat: graph-mode defaults whatever set_graph_mode says."""

import jax.numpy as jnp
import pytest

from refax import nnx


def test_compat_split_keeps_sharing_in_tree_mode():
    shared = nnx.Param(jnp.ones(2))
    with nnx.set_graph_mode(False):
        with pytest.raises(ValueError, match="does not support shared references"):
            nnx.split([shared, shared])
        graphdef, state = nnx.compat.split([shared, shared])
    assert len(nnx.to_flat_state(state)) == 1
    a, b = nnx.merge(graphdef, state)
    assert a is b


def test_compat_jit_propagates_structure_with_updates_off():
    m = nnx.Module()

    @nnx.compat.jit
    def grow(m):
        m.w = nnx.Param(jnp.zeros(1))

    with nnx.set_graph_updates(False):
        grow(m)
    assert isinstance(m.w, nnx.Param)


def test_every_compat_name_is_a_graph_mode_refax_function():
    for name in nnx.compat.__all__:
        wrapped = getattr(nnx.compat, name)
        assert wrapped.func is getattr(nnx, name)
        assert wrapped.keywords["graph"] is True
