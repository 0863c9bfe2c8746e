"""``nnx.EMA``: an exponential moving average of a model's Variables.

``EMA(model, decay)`` copies the Variables selected by ``only`` (by default all of them) into
its own ``params`` State; each ``ema.update(model)`` moves them towards the model's current
values: ``ema = decay * ema + (1 - decay) * value``. The copies are Variables with the same
type and metadata (shardings included), so the EMA is part of the object graph and is updated
inside ``nnx.jit`` like the model. ``ema.apply_to(model)`` gives a model that uses the averaged
Variables (kept live: later updates show through it).

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> model = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
  >>> ema = nnx.EMA(model, decay=0.9)
  >>> start = model.kernel[...]
  >>> model.kernel[...] = start + 1.0
  >>> ema.update(model)
  >>> bool(jnp.allclose(ema.params["kernel"][...], start + 0.1))
  True
  >>> averaged = ema.apply_to(model)
  >>> averaged.kernel is ema.params["kernel"]
  True
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from refax._filters import to_predicate
from refax._graph import merge as _merge
from refax._graph import split as _split
from refax._graph import state as _state
from refax._object import Pytree
from refax._statelib import State, to_flat_state
from refax._variables import Variable

__all__ = ["EMA"]

A = TypeVar("A")


def _copy_value(x: Any) -> Any:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return jnp.copy(x)  # keeps the sharding; the EMA never aliases the model's buffers
    return x


class EMA(Pytree):
    """Exponential moving average of the Variables of a model matching ``only``.

    Args:
      params: the model (any graph node) or a State whose Variables are averaged.
      decay: the weight of the running average at each update, in ``[0, 1]``.
      only: filter selecting the averaged Variables (default: all of them, ``...``).
      graph: passed to ``nnx.state`` (graph or tree mode); ``None`` uses the global setting.

    Attributes:
      params: a State of Variables holding the averages (same paths as the model's state).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from refax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> ema = nnx.EMA(model, decay=0.99, only=nnx.Param)
      >>> @nnx.jit
      ... def step(model, opt, ema, x):
      ...     grads = nnx.grad(lambda m: m(x).sum())(model)
      ...     opt.update(model, grads)
      ...     ema.update(model)
      >>> step(model, opt, ema, jnp.ones((1, 2)))
      >>> round(float(ema.params["bias"][...][0]), 6)  # 0.99 * 0 + 0.01 * (-0.1)
      -0.001
    """

    def __init__(self, params: Any, decay: float, *, only: Any = ..., graph: bool | None = None):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = float(decay)
        self.filter = only
        self.graph = graph
        source = self._select(params)
        flat = to_flat_state(source)
        self.params = State.from_flat_path(
            [
                (path, v.copy(_copy_value(v.get_value())) if isinstance(v, Variable) else v)
                for path, v in flat
            ]
        )

    def _select(self, node: Any) -> State:
        """The State of ``node`` (a graph node or a State) restricted to ``self.filter``."""
        if isinstance(node, State):
            if self.filter is ...:
                return node
            pred = to_predicate(self.filter)
            return State.from_flat_path([(p, v) for p, v in to_flat_state(node) if pred(p, v)])
        if self.filter is ...:
            return _state(node, graph=self.graph)
        return _state(node, self.filter, graph=self.graph)

    def update(self, updates: Any) -> None:
        """Moves the averages towards the current values of ``updates``.

        Args:
          updates: the model (or a State with the same paths) holding the new values.

        Raises:
          ValueError: when ``updates`` lacks a path the EMA averages.
        """
        new = dict(to_flat_state(self._select(updates)))
        decay = self.decay
        for path, ema_var in to_flat_state(self.params):
            if path not in new:
                raise ValueError(
                    f"EMA.update: the new values have no Variable at "
                    f"'{'/'.join(map(str, path))}', which the EMA averages; pass the same "
                    "model (or a State with the same paths) the EMA was built from."
                )
            value = new[path]
            value = value.get_value() if isinstance(value, Variable) else value
            old = ema_var.get_value()
            ema_var.set_value((decay * old + (1.0 - decay) * value).astype(old.dtype))

    def apply_to(self, model: A) -> A:
        """A copy of ``model`` whose averaged Variables are the EMA's own (other Variables are
        shared with ``model``).

        Args:
          model: the model the EMA was built from (same structure).

        Returns:
          A new model object; its averaged Variables are ``self.params``' Variables, so later
          ``update`` calls show through it.
        """
        graphdef, state = _split(model)
        flat = dict(to_flat_state(state))
        for path, var in to_flat_state(self.params):
            if path not in flat:
                raise ValueError(
                    f"EMA.apply_to: the model has no Variable at '{'/'.join(map(str, path))}'; "
                    "pass the model the EMA was built from."
                )
            flat[path] = var
        return _merge(graphdef, State.from_flat_path(list(flat.items())))
