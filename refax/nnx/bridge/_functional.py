"""``bridge.functional``: a refax Module class used through pure ``init`` / ``apply``
functions, Linen style, with the state passed explicitly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax

import refax as _nnx

__all__ = ["functional", "Functional"]

M = TypeVar("M")


class _Applied:
    """The Module rebuilt from one state: call it (or one of its methods) to get
    ``(output, new_state)``."""

    def __init__(self, graphdef: Any, state: Any):
        self._graphdef = graphdef
        self._state = state

    def _run(self, method: str | None, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        module = _nnx.merge(self._graphdef, self._state)
        fn = module if method is None else getattr(module, method)
        out = fn(*args, **kwargs)
        return out, _nnx.state(module)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self._run(None, args, kwargs)

    def __getattr__(self, name: str) -> Callable[..., tuple[Any, Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._run(name, args, kwargs)


class Functional(Generic[M]):
    """Pure ``init`` / ``apply`` for ``module_type(*args, **kwargs)``.

    Args:
      module_type: the refax Module class.
      args: its positional arguments.
      kwargs: its keyword arguments (``rngs`` is given to :meth:`init`).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> linear = bridge.functional(nnx.Linear)(3, 2)
      >>> state = linear.init(rngs=nnx.Rngs(0))
      >>> y, new_state = linear.apply(state)(jnp.ones((1, 3)))
      >>> y.shape
      (1, 2)
    """

    def __init__(self, module_type: Callable[..., M], args: tuple, kwargs: dict):
        self.module_type = module_type
        self.args = args
        self.kwargs = kwargs
        self.graphdef: Any = None

    def _build(self, **extra: Any) -> M:
        return self.module_type(*self.args, **self.kwargs, **extra)

    def init(self, **kwargs: Any) -> Any:
        """Builds the Module (``kwargs`` such as ``rngs=`` go to the constructor) and returns
        its State."""
        self.graphdef, state = _nnx.split(self._build(**kwargs))
        return state

    def apply(self, *states: Any) -> _Applied:
        """The Module rebuilt from ``states``; call the result to run it."""
        if self.graphdef is None:
            self.graphdef = _nnx.graphdef(_nnx.eval_shape(lambda: self._build()))
        state = _nnx.merge_state(*states) if len(states) > 1 else states[0]
        # fresh Variables: running the Module never changes the caller's state
        return _Applied(self.graphdef, jax.tree.map(lambda x: x, state))


def functional(module_type: Callable[..., M]) -> Callable[..., Functional[M]]:
    """Turns a refax Module class into a factory of :class:`Functional` objects.

    Args:
      module_type: the Module class.

    Returns:
      ``(*args, **kwargs) -> Functional``.

    Example:
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> f = bridge.functional(nnx.Linear)(2, 2)
      >>> sorted(f.init(rngs=nnx.Rngs(0)).keys())
      ['bias', 'kernel']
    """

    def make(*args: Any, **kwargs: Any) -> Functional[M]:
        return Functional(module_type, args, kwargs)

    return make
