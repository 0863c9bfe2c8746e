"""``nnx.Optimizer``: an optax transformation whose state lives in Variables.

The optimizer holds the optax state (``opt_state``, every array wrapped in an ``OptState``
Variable) and a ``step`` counter, so it is split, merged and transformed like any other object.
``optimizer.update(model, grads)`` applies one step to the model's Variables selected by
``wrt`` in place; it works eagerly and inside ``nnx.jit``.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from refax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  >>> bias = model.bias.value
  >>> _ = optimizer.update(model, grads)  # returns the optax updates
  >>> model.bias.value - bias, optimizer.step.value
  (Array([-0.1], dtype=float32), Array(1, dtype=uint32))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from refax._filters import to_predicate
from refax._graph import GraphState
from refax._graph import state as _state
from refax._graph import update as _update
from refax._object import Pytree
from refax._sharding import shard_value
from refax._statelib import State
from refax._variables import Param, Variable

__all__ = ["Optimizer", "ModelAndOptimizer", "OptState", "OptArray", "OptVariable"]


class OptState(Variable):
    """Base type of the Variables holding optimizer state."""

    __slots__ = ()


class OptArray(OptState):
    """Optimizer state derived from a plain array (e.g. Adam's ``count``)."""

    __slots__ = ()


class OptVariable(OptState):
    """Optimizer state derived from a Variable; it carries that Variable's metadata."""

    __slots__ = ()


def _is_variable(x: Any) -> bool:
    return isinstance(x, Variable)


def _pure(tree: Any) -> Any:
    """The same tree with every Variable replaced by its value."""
    return jax.tree.map(
        lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable
    )


def _opt_variable(value: Any, metadata: dict[str, Any]) -> OptVariable:
    """The OptVariable for the state of one parameter, carrying the parameter's metadata.

    ``optimizer_sharding`` metadata (a sharding meant for the optimizer state only) becomes
    the state's ``out_sharding``; with eager sharding on, the value is sharded as its
    ``out_sharding`` says (on the Variable's ``mesh`` or the current one).
    """
    meta = dict(metadata)
    if "optimizer_sharding" in meta:
        meta["out_sharding"] = meta.pop("optimizer_sharding")
    if meta.get("out_sharding") and meta.get("eager_sharding", True):
        value = shard_value(
            value, meta["out_sharding"], meta.get("sharding_rules"), meta.get("mesh")
        )
    return OptVariable.from_metadata(value, meta)  # type: ignore[return-value]


def _wrap_opt_state(opt_state: Any, params: State) -> Any:
    """Wraps each optax state array in an OptState Variable.

    Subtrees shaped like the parameters (Adam's ``mu``/``nu``) become OptVariables carrying
    each parameter's metadata (sharding names included); the rest become OptArrays.
    """
    param_leaves, param_def = jax.tree.flatten(params, is_leaf=_is_variable)

    def wrap(sub: Any) -> Any:
        if isinstance(sub, State):
            try:
                leaves, treedef = jax.tree.flatten(sub)
            except Exception:  # pragma: no cover
                leaves, treedef = None, None
            if treedef == jax.tree.structure(_pure(params)) and len(leaves) == len(param_leaves):
                new = [
                    _opt_variable(x, p.get_metadata()) if _is_variable(p) else OptArray(x)
                    for x, p in zip(leaves, param_leaves)
                ]
                return jax.tree.unflatten(treedef, new)
        return jax.tree.map(OptArray, sub)

    del param_def
    return jax.tree.map(wrap, opt_state, is_leaf=lambda x: isinstance(x, State))


def _only_wrt(grads: State, wrt: Any) -> State:
    """The gradients of the optimised Variables (grads may cover more, e.g. all Params)."""
    pred = to_predicate(wrt)
    flat = grads.flat_state()
    if all(isinstance(v, Variable) for v in flat.leaves):
        return grads.filter(wrt) if not all(pred(p, v) for p, v in flat) else grads
    return grads


def _check_grads(grads: Any, params: Any, wrt: Any) -> None:
    """A clear error when the gradients do not fit the optimised state."""
    g_paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    p_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    g_keys = {jax.tree_util.keystr(k): x for k, x in g_paths}
    p_keys = {jax.tree_util.keystr(k): x for k, x in p_paths}
    if g_keys.keys() != p_keys.keys():
        missing = sorted(p_keys.keys() - g_keys.keys())[:3]
        extra = sorted(g_keys.keys() - p_keys.keys())[:3]
        raise ValueError(
            f"Optimizer.update: the gradients do not match the optimised state (wrt={wrt!r}): "
            f"missing {missing}, unexpected {extra}. Pass grads computed for the same model, "
            "e.g. nnx.grad(loss_fn)(model)."
        )
    for key, p in p_keys.items():
        g = g_keys[key]
        if getattr(g, "shape", None) != getattr(p, "shape", None):
            raise ValueError(
                "Optimizer.update: the gradients do not match the optimised state: the gradient "
                f"at {key} has shape {getattr(g, 'shape', None)} but the parameter has shape "
                f"{getattr(p, 'shape', None)}."
            )


class Optimizer(Pytree):
    """An optax transformation applied to the Variables of a model matching ``wrt``.

    Args:
      model: the model whose state (filtered by ``wrt``) is optimised.
      tx: an ``optax.GradientTransformation``.
      wrt: filter selecting the optimised Variables (required; usually ``nnx.Param``).

    The state of each optimised Variable (e.g. Adam's ``mu``) is an ``OptVariable`` carrying
    that Variable's metadata; a Variable's ``optimizer_sharding`` metadata becomes its state's
    ``out_sharding``, so the optimizer state can be sharded differently from the parameters.

    Attributes:
      step: an ``OptState`` holding the number of updates applied (``uint32``).
      opt_state: the optax state, its arrays in ``OptState`` Variables.
      tx: the transformation; wrt: the filter.
    """

    def __init__(self, model: Any, tx: optax.GradientTransformation, *, wrt: Any = None):
        if wrt is None:
            raise TypeError(
                "Optimizer needs wrt=, the filter of the Variables to optimise, e.g. "
                "nnx.Optimizer(model, tx, wrt=nnx.Param)."
            )
        self.step = OptState(jnp.array(0, dtype=jnp.uint32))
        self.tx = tx
        self.wrt = wrt
        params = _state(model, wrt)
        self.opt_state = _wrap_opt_state(tx.init(_pure(params)), params)

    def update(self, model: Any, grads: Any, /, **kwargs: Any) -> Any:
        """Applies one optimisation step to ``model`` in place; returns the optax updates.

        Args:
          model: the model (the same structure the optimizer was built for).
          grads: gradients shaped like ``nnx.state(model, wrt)`` (what ``nnx.grad`` returns),
            or an object of gradients (what ``jax.grad`` returns for a Module argument).
          **kwargs: extra arguments for optax (e.g. ``value``, ``grad``, ``value_fn``).
        """
        params = _state(model, self.wrt)
        if isinstance(grads, GraphState):  # (what nnx.grad returns for unpack()ed inputs)
            grads = grads._state
        elif isinstance(grads, Pytree):  # e.g. ``jax.grad`` of a Module: a Module of gradients
            grads = _state(grads, self.wrt)
        if isinstance(grads, State):
            grads = _only_wrt(grads, self.wrt)
        raw_params = _pure(params)
        raw_grads = _pure(grads)
        _check_grads(raw_grads, raw_params, self.wrt)
        opt_state = _pure(self.opt_state)
        kwargs = {k: _pure(v) if isinstance(v, (State, Variable)) else v for k, v in kwargs.items()}
        updates, new_opt_state = self.tx.update(raw_grads, opt_state, raw_params, **kwargs)
        new_params = optax.apply_updates(raw_params, updates)
        _update(model, new_params)
        for var, value in zip(
            jax.tree.leaves(self.opt_state, is_leaf=_is_variable), jax.tree.leaves(new_opt_state)
        ):
            var.set_value(value)
        self.step.set_value(self.step.get_value() + 1)
        return updates


class ModelAndOptimizer(Optimizer):
    """An Optimizer that also holds its model: ``update(grads)`` needs no model argument."""

    def __init__(self, model: Any, tx: optax.GradientTransformation, *, wrt: Any = Param):
        super().__init__(model, tx, wrt=wrt)
        self.model = model

    def update(self, grads: Any, /, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().update(self.model, grads, **kwargs)
