"""Helpers shared by the differential tests that compare refax with the oracle flax.nnx."""

import jax
import jax.numpy as jnp
import numpy as np


def to_numpy(x):
    """A numpy copy of ``x``; PRNG keys become their key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def pure(lib, obj):
    """``obj``'s whole state (or a State itself) as a nested dict of numpy arrays."""
    state = obj if isinstance(obj, lib.State) else lib.state(obj)
    return jax.tree.map(to_numpy, lib.to_pure_dict(state))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b), (a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
