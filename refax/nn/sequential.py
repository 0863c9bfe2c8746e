"""``Sequential``: chains callables, feeding each one's output to the next.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn import Linear, Sequential, relu
  >>> model = Sequential(Linear(2, 8, rngs=Rngs(0)), relu, Linear(8, 1, rngs=Rngs(1)))
  >>> model(jnp.ones((4, 2))).shape
  (4, 1)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from refax._module import Module

if TYPE_CHECKING:
    from refax._rngs import Rngs

__all__ = ["Sequential"]


def _takes_rngs(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("rngs")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


class Sequential(Module):
    """Calls ``fns`` in order: ``Sequential(f, g, h)(x) == h(g(f(x)))``.

    A tuple output is unpacked as positional arguments of the next callable and a dict output
    as keyword arguments. Call-time keyword arguments go to the first callable; call-time
    ``rngs`` go to every callable that has an ``rngs`` parameter. With no callables the
    positional arguments are returned unchanged (a single one by itself), else the keyword
    arguments (``None`` when there are none).

    Args:
      *fns: Modules or functions, stored in the ``layers`` list.

    Example:
      >>> from refax.nn import Sequential
      >>> Sequential(lambda x: (x, x + 1), lambda a, b: a * b)(3)
      12
    """

    def __init__(self, *fns: Callable[..., Any]):
        self.layers = list(fns)

    def __call__(self, *args: Any, rngs: Rngs | None = None, **kwargs: Any) -> Any:
        """Runs the chain on ``args``/``kwargs``."""
        if not self.layers:
            if args:
                return args[0] if len(args) == 1 else args
            return kwargs or None
        output: Any = None
        for i, fn in enumerate(self.layers):
            if not callable(fn):
                raise TypeError(f"Sequential: layer {i} is not callable: {fn!r}.")
            if i > 0:
                if isinstance(output, tuple):
                    args, kwargs = output, {}
                elif isinstance(output, dict):
                    args, kwargs = (), output
                else:
                    args, kwargs = (output,), {}
            if rngs is not None and _takes_rngs(fn):
                kwargs = {**kwargs, "rngs": rngs}
            output = fn(*args, **kwargs)
        return output
