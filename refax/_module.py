"""Module: the base class of layers and models, and the iteration over a graph's Modules.

``Module`` is a :class:`refax._object.Pytree` with the helpers layers use: ``sow`` / ``perturb``
(records and perturbations, redirected by :func:`refax.capture`), ``iter_modules`` /
``iter_children``, ``set_attributes`` and ``train`` / ``eval``. It lives above the graph layer
(``refax._graph``) because those helpers walk the graph; the graph itself only knows
``Pytree``.

Example:
  >>> from refax import nnx
  >>> class Block(nnx.Module):
  ...   def __init__(self):
  ...     self.drop = nnx.Dropout(0.5)
  ...     self.inner = nnx.Dict(norm=nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
  >>> [path for path, _ in Block().iter_modules()]
  [('drop',), ('inner', 'norm'), ('inner',), ()]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from refax._filters import to_predicate
from refax._graph import iter_children as _iter_children
from refax._graph import iter_graph
from refax._object import Pytree
from refax._variables import Perturbation, Variable, variable_type_from_name

__all__ = ["Module", "M", "iter_modules", "iter_module_children"]

M = TypeVar("M", bound="Module")
_MISSING = object()
_CAPTURES = "__captures__"  # set by refax.capture on every Module it runs (see _capture.py)


def _record_error(
    action: str, module: Module, name: str, existing: Any, variable_type: type
) -> ValueError:
    """The error of ``sow`` / ``perturb`` when attribute ``name`` holds something else."""
    where = f"{type(module).__name__}.{name}"
    if not isinstance(existing, Variable):
        return ValueError(
            f"Cannot {action} {where}: expected the attribute to be a Variable, got "
            f"{type(existing).__name__}. Use another name, or delete the attribute first."
        )
    return ValueError(
        f"Cannot {action} {where}: expected the attribute to be of type "
        f"{variable_type.__name__}, got {type(existing).__name__}. Use another name, or the "
        f"attribute's own Variable type."
    )


def _as_type(variable_type: type[Variable] | str) -> type[Variable]:
    """A Variable type, or the one registered under a name (registered now if new)."""
    if isinstance(variable_type, str):
        return variable_type_from_name(variable_type, allow_register=True)
    return variable_type


def _captured(module: Any, variable_type: type) -> tuple[bool, Variable | None]:
    """``(capturing, var)``: whether ``module`` runs inside :func:`refax.capture`, and then the
    capture's Variable collecting ``variable_type`` (None when that type is not captured)."""
    captures = module.__dict__.get(_CAPTURES)
    if captures is None:
        return False, None
    return True, next((v for v in captures if type(v) is variable_type), None)


def _tuple_reduce(xs: Any, x: Any) -> tuple:
    return (*xs, x)


def _tuple_init() -> tuple:
    return ()


class Module(Pytree):
    """Base class for layers and models.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Scale(nnx.Module):
      ...   def __init__(self):
      ...     self.s = nnx.Param(jnp.array(2.0))
      ...   def __call__(self, x):
      ...     self.sow(nnx.Intermediate, 'seen', x)
      ...     return x * self.s
      >>> m = Scale()
      >>> m(jnp.array(3.0))
      Array(6., dtype=float32, weak_type=True)
      >>> m.seen.value
      (Array(3., dtype=float32, weak_type=True),)
    """

    def sow(
        self,
        variable_type: type[Variable] | str,
        name: str,
        value: Any,
        reduce_fn: Callable[[Any, Any], Any] = _tuple_reduce,
        init_fn: Callable[[], Any] = _tuple_init,
    ) -> bool:
        """Records ``value`` under ``name``, folding repeated calls with ``reduce_fn``.

        Inside :func:`refax.capture` the value goes to the capture's collection for
        ``variable_type`` (returned by ``capture``); when that type is not being captured
        the call does nothing and returns False. Outside ``capture`` the value is stored in a
        Variable attribute ``name`` of this Module (created on the first call).

        Args:
          variable_type: the Variable type (or its registered name) of the record, usually
            :class:`Intermediate`.
          name: the key of the record.
          value: the value to record.
          reduce_fn: ``reduce_fn(previous, value)`` gives the new record (default: append to
            a tuple).
          init_fn: gives the ``previous`` of the first call (default: an empty tuple).

        Returns:
          True if the value was recorded.
        """
        variable_type = _as_type(variable_type)
        capturing, var = _captured(self, variable_type)
        if capturing:
            if var is None:
                return False
            records = var.get_value()
            previous = records[name] if name in records else init_fn()
            var.set_value({**records, name: reduce_fn(previous, value)})
            return True
        existing = self.__dict__.get(name, _MISSING)
        if existing is _MISSING:
            setattr(self, name, variable_type(reduce_fn(init_fn(), value)))
        elif isinstance(existing, variable_type):
            existing.set_value(reduce_fn(existing.get_value(), value))
        else:
            raise _record_error("sow into", self, name, existing, variable_type)
        return True

    def perturb(
        self, name: str, value: Any, variable_type: type[Variable] | str = Perturbation
    ) -> Any:
        """Returns ``value`` plus a perturbation ``name`` (zeros at first) to take gradients at.

        Inside :func:`refax.capture` the perturbation comes from the capture's collection for
        ``variable_type`` (its ``init=`` State, or zeros recorded on the first call); when
        that type is not being captured, ``value`` is returned unchanged. Outside ``capture``
        it is a Variable attribute ``name`` of this Module. Gradients with respect to the
        perturbation are gradients with respect to the intermediate ``value``.

        Args:
          name: the key of the perturbation.
          value: the intermediate value (an array or pytree of arrays).
          variable_type: the Variable type (or its registered name) of the perturbation.

        Returns:
          ``value + perturbation``: use it in place of ``value``.
        """
        variable_type = _as_type(variable_type)
        capturing, var = _captured(self, variable_type)
        if capturing:
            if var is None:
                return value
            records = var.get_value()
            if name not in records:
                records = {**records, name: jax.tree.map(jnp.zeros_like, value)}
                var.set_value(records)
            return jax.tree.map(jnp.add, records[name], value)
        existing = self.__dict__.get(name, _MISSING)
        if existing is _MISSING:
            setattr(self, name, variable_type(jax.tree.map(jnp.zeros_like, value)))
            existing = self.__dict__[name]
        elif not isinstance(existing, variable_type):
            raise _record_error("perturb", self, name, existing, variable_type)
        return jax.tree.map(jnp.add, existing.get_value(), value)

    def iter_modules(self) -> Iterator[tuple[tuple, Module]]:
        """Yields ``(path, module)`` for every Module reachable from this one (children before
        their parent, so this one last)."""
        return iter_modules(self)

    def iter_children(self) -> Iterator[tuple[Any, Any]]:
        """Yields ``(key, child)`` for the direct graph-node children (Modules, Variables)."""
        return _iter_children(self)

    def set_attributes(
        self,
        *filters: Any,
        raise_if_not_found: bool = True,
        graph: bool | None = None,
        **attributes: Any,
    ) -> None:
        """Sets attributes on every sub-Module (matching ``filters``, default all) that has them.

        Raises ValueError naming the attributes no Module had, unless ``raise_if_not_found``
        is False. ``graph`` selects the traversal mode (None reads the default).
        """
        preds = [to_predicate(f) for f in filters]
        remaining = set(attributes)
        modules = self.iter_modules() if graph is None else iter_modules(self, graph=graph)
        for path, module in modules:
            if preds and not any(p(path, module) for p in preds):
                continue
            for name, value in attributes.items():
                if hasattr(module, name):
                    setattr(module, name, value)
                    remaining.discard(name)
        if remaining and raise_if_not_found:
            raise ValueError(
                "Could not find at least one instance of the following attributes: "
                f"{sorted(remaining)} among the sub-Modules of {type(self).__name__} (matching "
                "the filters). Check the names, or pass raise_if_not_found=False to skip them."
            )

    def train(self, **attributes: Any) -> None:
        """Training mode: ``deterministic=False``, ``use_running_average=False`` everywhere."""
        self.set_attributes(
            deterministic=False, use_running_average=False, **attributes, raise_if_not_found=False
        )

    def eval(self, **attributes: Any) -> None:
        """Evaluation mode: ``deterministic=True``, ``use_running_average=True`` everywhere."""
        self.set_attributes(
            deterministic=True, use_running_average=True, **attributes, raise_if_not_found=False
        )

    def set_view(self, **kwargs: Any) -> None:  # overridden by layers that have view flags
        """Hook used by ``nnx.view``; the base Module accepts no view arguments."""
        if kwargs:
            raise ValueError(f"{type(self).__name__}.set_view got unknown {sorted(kwargs)}")


def iter_modules(node: Any, *, graph: bool | None = None) -> Iterator[tuple[tuple, Module]]:
    """Yields ``(path, module)`` for every Module reachable from ``node`` (root last)."""
    for path, value in iter_graph(node, graph=graph):
        if isinstance(value, Module):
            yield path, value


def iter_module_children(node: Any, *, graph: bool | None = None) -> Iterator[tuple[Any, Module]]:
    """Like :func:`refax.iter_children`, but only Module children."""
    for key, value in _iter_children(node, graph=graph):
        if isinstance(value, Module):
            yield key, value
