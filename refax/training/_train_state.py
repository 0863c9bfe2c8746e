"""``nnx.TrainState``: the functional training-state record of older NNX code.

Before Modules held their own state, a training loop carried an immutable record: the model's
``GraphDef``, its parameters as a ``State``, the optax state, a step counter and the optax
transformation. ``TrainState`` is that record, a frozen dataclass registered as a JAX pytree
(``graphdef`` and ``tx`` are static, everything else is a child), so it passes through
``jax.jit`` as one argument. New code keeps the state in the model and uses
:class:`refax.training.Optimizer` instead.

Subclasses add fields with plain annotations (``batch_stats: nnx.State``): every subclass is
turned into a frozen dataclass and registered as a pytree when it is defined. A field declared
``nnx.static()`` is static (part of the treedef).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from refax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> graphdef, params = nnx.split(model, nnx.Param)
  >>> state = nnx.TrainState.create(graphdef, params=params, tx=optax.sgd(0.5))
  >>> y, _ = state.apply('params')(jnp.ones((1, 2)))
  >>> grads = jax.tree.map(jnp.ones_like, state.params)
  >>> state = state.apply_gradients(grads)
  >>> state.step, state.params['bias'][...]
  (Array(1, dtype=int32, weak_type=True), Array([-0.5], dtype=float32))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import optax

from refax._graph import GraphDef
from refax._object import _FIELD_KEY
from refax._statelib import State

__all__ = ["TrainState"]

M = TypeVar("M")
TS = TypeVar("TS", bound="TrainState")

# fields of TrainState itself that are static: part of the treedef, not children
_STATIC_FIELDS = frozenset({"graphdef", "tx"})


def _register(cls: type) -> None:
    """Makes ``cls`` a frozen dataclass and registers it as a JAX pytree."""
    dataclasses.dataclass(frozen=True)(cls)
    data, meta = [], []
    for f in dataclasses.fields(cls):
        kind = f.metadata.get(_FIELD_KEY)
        static = kind == "static" or (kind is None and f.name in _STATIC_FIELDS)
        (meta if static else data).append(f.name)
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


class TrainState(Generic[M]):
    """An immutable training state: GraphDef, parameters, optax state, step and optimizer.

    Attributes:
      graphdef: the model's GraphDef (static).
      params: the trained State (usually the ``nnx.Param`` part of ``nnx.split``).
      opt_state: the optax state of ``params``.
      step: the number of ``apply_gradients`` calls so far (an array).
      tx: the optax transformation (static).
    """

    graphdef: GraphDef
    params: State
    opt_state: Any
    step: jax.Array
    tx: optax.GradientTransformation

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

    @classmethod
    def create(
        cls: type[TS],
        graphdef: GraphDef,
        *,
        params: State,
        tx: optax.GradientTransformation,
        step: int = 0,
        **kwargs: Any,
    ) -> TS:
        """Builds a state with a fresh optax state for ``params``.

        Args:
          graphdef: the model's GraphDef.
          params: the State to train.
          tx: the optax transformation.
          step: the initial step count.
          **kwargs: the fields a subclass adds (e.g. ``batch_stats=...``).

        Returns:
          The new state.
        """
        return cls(
            graphdef=graphdef,
            params=params,
            opt_state=tx.init(params),
            step=jnp.asarray(step),
            tx=tx,
            **kwargs,
        )

    def apply(self, state: State | str, *states: State | str) -> Any:
        """Calls the model functionally with the given States.

        Args:
          state, *states: States, or names of this record's State fields (``'params'``,
            ``'batch_stats'``, ...).

        Returns:
          A proxy: ``state.apply('params')(x)`` (or ``.method(x)``) returns
          ``(output, (graphdef, updated_state))``, as ``GraphDef.apply`` does.

        Raises:
          TypeError: a named field does not hold a State.
        """
        resolved = []
        for s in (state, *states):
            if isinstance(s, str):
                value = getattr(self, s)
                if not isinstance(value, State):
                    raise TypeError(
                        f"{type(self).__name__}.apply({s!r}): the field {s!r} holds a "
                        f"{type(value).__name__}, not a State; pass the State itself."
                    )
                s = value
            resolved.append(s)
        return self.graphdef.apply(*resolved)

    def apply_gradients(self: TS, grads: State, **kwargs: Any) -> TS:
        """Returns the state after one optimizer step with ``grads``.

        Args:
          grads: gradients with the structure of ``params``.
          **kwargs: other fields to replace at the same time (e.g. ``batch_stats=...``).

        Returns:
          A new state: updated ``params`` and ``opt_state``, ``step + 1``.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1, **kwargs)

    def replace(self: TS, **changes: Any) -> TS:
        """Returns a copy with the given fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


_register(TrainState)
