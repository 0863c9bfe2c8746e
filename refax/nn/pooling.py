"""Pooling functions: :func:`pool` and its specialisations :func:`avg_pool`, :func:`max_pool`
and :func:`min_pool`.

Pooling slides a window over the spatial dimensions of channels-last inputs
``(*batch_dims, *spatial_dims, features)`` and reduces each window to one value with XLA's
``ReduceWindow`` (``jax.lax.reduce_window``). The window never spans batch or feature axes. The
number of spatial dimensions is ``len(window_shape)``; inputs may have any number of leading
batch dimensions, including none. Padded positions hold the reduction's initial value
(``-inf`` for ``max_pool``, ``+inf`` for ``min_pool``, ``0`` for ``avg_pool``).

Example:
  >>> import jax.numpy as jnp
  >>> from refax.nn.pooling import avg_pool, max_pool
  >>> x = jnp.arange(8.0).reshape(1, 4, 2)  # (batch, length, features)
  >>> max_pool(x, (2,), strides=(2,))[0]
  Array([[2., 3.],
         [6., 7.]], dtype=float32)
  >>> avg_pool(x, (2,), padding='SAME', count_include_pad=False)[0, -1]
  Array([6., 7.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from refax.nn import _checks
from refax.nn.conv import canonicalize_padding
from refax.typing import LaxPadding

__all__ = ["pool", "avg_pool", "max_pool", "min_pool"]

_STRING_PADDINGS = ("SAME", "VALID", "SAME_LOWER")


_is_int = _checks.is_int


def _window(window_shape: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(window_shape, Sequence) or not all(_is_int(w) for w in window_shape):
        raise TypeError(
            "pool: window_shape must be a sequence of ints, one per spatial dim, got "
            f"{window_shape!r} (use (k,) for a 1-D window)."
        )
    _checks.positive_ints(
        "pool",
        "window_shape",
        window_shape,
        "Pass the window size, e.g. (2, 2) for 2-D pooling.",
        allow_int=False,
        per="one per spatial dim",
    )
    return tuple(int(w) for w in window_shape)


def pool(
    inputs: jax.Array,
    init: Any,
    reduce_fn: Callable[[Any, Any], Any],
    window_shape: Sequence[int],
    strides: Sequence[int] | None,
    padding: LaxPadding,
) -> jax.Array:
    """Reduces every window of the spatial dims of ``inputs`` with ``reduce_fn``.

    Pooling is done with ``lax.reduce_window``; differentiability depends on ``reduce_fn`` and
    ``init`` (``lax.add``/``lax.max``/``lax.min`` with their identity are differentiable).

    Args:
      inputs: array of shape ``(*batch_dims, *spatial_dims, features)``; zero or more batch dims.
      init: the initial value of the reduction (also the value of padded positions).
      reduce_fn: a reduction ``(T, T) -> T`` such as ``lax.add``.
      window_shape: window size, one int per spatial dim.
      strides: inter-window strides, one int per spatial dim (``None`` or empty: all 1).
      padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, or one ``(low, high)`` pair (or int)
        per spatial dim.

    Returns:
      The reduction of each window, of shape ``(*batch_dims, *spatial_out, features)``.

    Raises:
      ValueError: ``inputs`` has fewer than ``len(window_shape) + 1`` dims, or ``strides`` /
        ``padding`` do not give one entry per spatial dim.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax import lax
      >>> from refax.nn.pooling import pool
      >>> x = jnp.arange(6.0).reshape(3, 2)  # unbatched (length, features)
      >>> pool(x, 0.0, lax.add, (2,), None, 'VALID')
      Array([[2., 4.],
             [6., 8.]], dtype=float32)
    """
    inputs = jnp.asarray(inputs)
    window = _window(window_shape)
    n = len(window)
    n_batch = inputs.ndim - (n + 1)
    if n_batch < 0:
        raise ValueError(
            f"pool with window_shape={window} expects inputs of shape (*batch_dims, {n} spatial "
            f"dims, features), i.e. rank >= {n + 1}; got inputs of shape {inputs.shape}."
        )
    if strides is None or (isinstance(strides, Sequence) and len(strides) == 0):
        strides = (1,) * n
    elif _is_int(strides):
        strides = (int(strides),) * n  # type: ignore[arg-type]
    strides = tuple(strides)
    if len(strides) != n:
        raise ValueError(
            f"pool: strides {strides} must have one entry per spatial dim of window_shape {window}."
        )
    _checks.positive_ints(
        "pool",
        "strides",
        strides,
        "Pass the step between windows, e.g. (2, 2), or None for 1.",
        allow_int=False,
        per="one per spatial dim",
    )
    if isinstance(padding, str):
        lax_padding: Any = padding.upper()
        if lax_padding not in _STRING_PADDINGS:
            raise ValueError(
                f"pool: unknown padding {padding!r}; expected 'SAME', 'VALID', 'SAME_LOWER' or "
                f"one (low, high) pair per spatial dim of window_shape {window}."
            )
    else:
        pads = canonicalize_padding(padding, n)
        lax_padding = ((0, 0),) * n_batch + tuple(pads) + ((0, 0),)
    dims = (1,) * n_batch + window + (1,)
    full_strides = (1,) * n_batch + strides + (1,)
    return lax.reduce_window(inputs, init, reduce_fn, dims, full_strides, lax_padding)


def avg_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: LaxPadding = "VALID",
    count_include_pad: bool = True,
) -> jax.Array:
    """Averages every window of the spatial dims of ``inputs``.

    Args:
      inputs: array of shape ``(*batch_dims, *spatial_dims, features)``.
      window_shape: window size, one int per spatial dim.
      strides: inter-window strides (default: all 1).
      padding: ``'SAME'``, ``'VALID'`` (default) or one ``(low, high)`` pair per spatial dim.
      count_include_pad: if True every window is divided by its full size, padded positions
        included (counting as zeros); if False only the real input positions are counted (the
        divisor is then computed in ``float32``, so low-precision inputs give ``float32``).

    Returns:
      The mean of each window.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.pooling import avg_pool
      >>> avg_pool(jnp.ones((1, 3, 1)), (2,), padding=((1, 0),))[0, :, 0]
      Array([0.5, 1. , 1. ], dtype=float32)
    """
    inputs = jnp.asarray(inputs)
    window = _window(window_shape)
    y = pool(inputs, 0.0, lax.add, window, strides, padding)
    if count_include_pad:
        return y / np.prod(window)
    n_batch = inputs.ndim - (len(window) + 1)
    ones = jnp.ones((1,) * n_batch + inputs.shape[n_batch:-1] + (1,))
    return y / pool(ones, 0.0, lax.add, window, strides, padding)


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: LaxPadding = "VALID",
) -> jax.Array:
    """Takes the maximum of every window (padded positions are ``-inf``).

    Args:
      inputs: array of shape ``(*batch_dims, *spatial_dims, features)``.
      window_shape: window size, one int per spatial dim.
      strides: inter-window strides (default: all 1).
      padding: ``'SAME'``, ``'VALID'`` (default) or one ``(low, high)`` pair per spatial dim.

    Returns:
      The maximum of each window.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.pooling import max_pool
      >>> max_pool(jnp.array([[[1.0], [3.0], [2.0]]]), (2,))[0, :, 0]
      Array([3., 3.], dtype=float32)
    """
    return pool(inputs, -jnp.inf, lax.max, window_shape, strides, padding)


def min_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: LaxPadding = "VALID",
) -> jax.Array:
    """Takes the minimum of every window (padded positions are ``+inf``).

    Args:
      inputs: array of shape ``(*batch_dims, *spatial_dims, features)``.
      window_shape: window size, one int per spatial dim.
      strides: inter-window strides (default: all 1).
      padding: ``'SAME'``, ``'VALID'`` (default) or one ``(low, high)`` pair per spatial dim.

    Returns:
      The minimum of each window.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.pooling import min_pool
      >>> min_pool(jnp.array([[[1.0], [3.0], [2.0]]]), (2,))[0, :, 0]
      Array([1., 2.], dtype=float32)
    """
    return pool(inputs, jnp.inf, lax.min, window_shape, strides, padding)
