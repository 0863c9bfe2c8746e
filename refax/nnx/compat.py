"""The reference's ``nnx.compat``: graph-mode versions of the graph functions and transforms.

Each name here is the refax function with ``graph=True`` (and, for transforms,
``graph_updates=True``) as its default, whatever ``set_graph_mode`` / ``set_graph_updates``
say: code written for graph semantics (shared references, structural updates propagated out
of transforms) keeps them in a process that defaults to tree mode.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> shared = nnx.Param(jnp.ones(2))
  >>> with nnx.set_graph_mode(False):
  ...   graphdef, state = nnx.compat.split([shared, shared])  # sharing is fine here
  >>> len(nnx.to_flat_state(state))
  1
"""

from __future__ import annotations

import functools

import refax as _refax

_GRAPH = (
    "split",
    "state",
    "clone",
    "graphdef",
    "iter_graph",
    "recursive_map",
    "view",
    "view_info",
    "iter_modules",
    "iter_children",
    "reseed",
    "backup_keys",
    "get_abstract_model",
)
_GRAPH_AND_UPDATES = (
    "cached_partial",
    "split_rngs",
    "fork_rngs",
    "jit",
    "shard_map",
    "grad",
    "value_and_grad",
    "custom_vjp",
    "vjp",
    "jvp",
    "remat",
    "vmap",
    "scan",
    "pmap",
    "while_loop",
    "fori_loop",
    "eval_shape",
    "cond",
    "switch",
    "checkify",
)


def _graph_mode(name: str, *, updates: bool) -> functools.partial:
    kwargs = {"graph": True, "graph_updates": True} if updates else {"graph": True}
    wrapped = functools.partial(getattr(_refax, name), **kwargs)
    wrapped.__doc__ = f"``refax.{name}`` with {', '.join(f'{k}=True' for k in kwargs)}."
    return wrapped


for _name in _GRAPH:
    globals()[_name] = _graph_mode(_name, updates=False)
for _name in _GRAPH_AND_UPDATES:
    globals()[_name] = _graph_mode(_name, updates=True)

__all__ = [*_GRAPH, *_GRAPH_AND_UPDATES]
del _name
