"""Submodules of the other kind inside a bridge Module: a refax Module
(:func:`nnx_in_bridge_mdl`) or a Linen module (:func:`linen_in_bridge_mdl`).

Both are called from a running bridge Module method (``setup`` or a compact method). The new
submodule is built with the bridge model's :class:`~refax.Rngs`; in a compact method it is
attached under Linen's automatic name (``NNXLayer_0``, ``Dense_0``, ...) or ``name``, and
calling the method again returns the same submodule. In ``setup`` it takes the name of the
attribute it is assigned to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import linen as nn

import refax as _nnx
from refax.nnx.bridge import _context
from refax.nnx.bridge._module import Module
from refax.nnx.bridge._wrappers import ToNNX

__all__ = ["nnx_in_bridge_mdl", "linen_in_bridge_mdl"]


def _frame(what: str) -> _context.ModuleFrame:
    frame = _context.current_context()
    if frame is None or not isinstance(frame.module, Module):
        raise ValueError(
            f"bridge.{what} must be called inside a method (setup or a compact method) of a "
            "bridge.Module."
        )
    return frame


def _rngs(frame: _context.ModuleFrame) -> _nnx.Rngs | None:
    scope = frame.module.scope
    return None if scope is None else scope.rngs


def _existing(parent: Module, name: str | None, kind: type) -> Any:
    if name is None:
        return None
    current = parent.__dict__.get(name)
    return current if isinstance(current, kind) else None


def nnx_in_bridge_mdl(factory: Callable[[_nnx.Rngs], Any], name: str | None = None) -> Any:
    """A refax Module built by ``factory(rngs)`` as a submodule of the running bridge Module.

    Args:
      factory: called with the bridge model's :class:`~refax.Rngs`; returns the Module.
      name: its name (default: Linen's automatic ``ClassName_N`` in a compact method, the
        attribute name in ``setup``).

    Returns:
      The refax Module (the existing one when a compact method runs again).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> class Model(bridge.Module):
      ...   @bridge.compact
      ...   def __call__(self, x):
      ...     return bridge.nnx_in_bridge_mdl(lambda r: nnx.Linear(3, 2, rngs=r))(x)
      >>> variables = Model().init(0, jnp.ones((1, 3)))
      >>> variables["params"]["Linear_0"]["kernel"].shape
      (3, 2)
    """
    frame = _frame("nnx_in_bridge_mdl")
    parent = frame.module
    found = _existing(parent, name, _nnx.Pytree)
    if found is not None:
        return found
    module = factory(_rngs(frame))
    if name is None and frame.in_compact:
        name = frame.next_name(type(module).__name__)
        found = _existing(parent, name, _nnx.Pytree)
        if found is not None and not isinstance(found, Module):
            return found
    if name is not None:
        setattr(parent, name, module)
    return module


def linen_in_bridge_mdl(linen_module: nn.Module, name: str | None = None) -> ToNNX:
    """A Linen module as a submodule (a :class:`ToNNX`) of the running bridge Module.

    Its variables are created while the bridge model initialises and live in the bridge
    model's variables under the submodule's name.

    Args:
      linen_module: the Linen module.
      name: its name (default: Linen's automatic ``ClassName_N`` in a compact method, the
        attribute name in ``setup``).

    Returns:
      The :class:`ToNNX` wrapper (the existing one when a compact method runs again).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from refax.nnx import bridge
      >>> class Model(bridge.Module):
      ...   @bridge.compact
      ...   def __call__(self, x):
      ...     return bridge.linen_in_bridge_mdl(nn.Dense(2))(x)
      >>> variables = Model().init(0, jnp.ones((1, 3)))
      >>> variables["params"]["Dense_0"]["kernel"].shape
      (3, 2)
    """
    frame = _frame("linen_in_bridge_mdl")
    parent = frame.module
    if name is None and frame.in_compact:
        name = frame.next_name(type(linen_module).__name__)
    found = _existing(parent, name, ToNNX)
    if found is not None:
        return found
    module = ToNNX(linen_module, rngs=_rngs(frame))
    if name is not None:
        setattr(parent, name, module)
    return module
