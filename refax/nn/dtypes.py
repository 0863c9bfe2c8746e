"""Dtype helpers shared by the layers: which dtype a computation runs in.

Layers keep their parameters in ``param_dtype`` and compute in ``dtype``. When ``dtype`` is
``None`` the computation dtype is inferred from the inputs and parameters with JAX's type
promotion rules, promoting integers to ``float32`` unless ``inexact=False``.

Example:
  >>> import jax.numpy as jnp
  >>> from refax.nn.dtypes import canonicalize_dtype, promote_dtype
  >>> canonicalize_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float32))
  dtype('float32')
  >>> x, k, b = promote_dtype((jnp.ones(2, jnp.int32), jnp.ones(2, jnp.bfloat16), None))
  >>> x.dtype, k.dtype, b
  (dtype(bfloat16), dtype(bfloat16), None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from refax.typing import Dtype
from refax.typing import PromoteDtypeFn as PromoteDtypeFn

__all__ = ["canonicalize_dtype", "promote_dtype", "PromoteDtypeFn"]


def canonicalize_dtype(*args: Any, dtype: Dtype | None = None, inexact: bool = True) -> Any:
    """Returns the dtype a computation over ``args`` should run in.

    Args:
      *args: arrays, scalars or ``None`` (ignored) taking part in the computation.
      dtype: an explicit dtype; when given it wins over the inferred one.
      inexact: when True the result must be a floating or complex dtype: an inferred integer
        dtype is promoted to ``float32`` and an explicit integer ``dtype`` is an error.

    Returns:
      The computation dtype.

    Raises:
      ValueError: ``inexact`` is True and an explicit ``dtype`` is not inexact.
    """
    if dtype is None:
        arrays = [jnp.asarray(x) for x in args if x is not None]
        dtype = jnp.result_type(*arrays)
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"Dtype must be inexact: {dtype}. Pass a floating point dtype (e.g. jnp.float32), "
            "or inexact=False for integer computations."
        )
    return dtype


def promote_dtype(
    args: Sequence[Any], /, *, dtype: Dtype | None = None, inexact: bool = True
) -> tuple[Any, ...]:
    """Casts every non-``None`` entry of ``args`` to one common dtype.

    Args:
      args: a sequence of arrays, Variables, scalars or ``None`` (passed through).
      dtype: the target dtype; ``None`` infers it with :func:`canonicalize_dtype`.
      inexact: see :func:`canonicalize_dtype`.

    Returns:
      A tuple with one ``jax.Array`` (or ``None``) per entry of ``args``.
    """
    dtype = canonicalize_dtype(*args, dtype=dtype, inexact=inexact)
    return tuple(None if x is None else jnp.asarray(x, dtype) for x in args)
