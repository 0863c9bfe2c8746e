"""Type aliases shared across refax."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import jax
import numpy as np

A = TypeVar("A")

Array: TypeAlias = jax.Array
Shape: TypeAlias = Sequence[int]
Dtype: TypeAlias = Any  # jnp.dtype, numpy dtype or scalar type
PrecisionLike: TypeAlias = None | str | jax.lax.Precision | tuple[str, str]
Key: TypeAlias = Hashable
PathParts: TypeAlias = tuple[Key, ...]
ArrayLike: TypeAlias = jax.Array | np.ndarray | float | int | bool
RngValue: TypeAlias = jax.Array
Axes: TypeAlias = int | Sequence[int]


class Initializer(Protocol):
    """``init(key, shape, dtype) -> Array``: creates a parameter value."""

    def __call__(self, key: jax.Array, shape: Shape, dtype: Dtype = ...) -> jax.Array: ...


class FilterPredicate(Protocol):
    """``predicate(path, value) -> bool``: the compiled form of every filter."""

    def __call__(self, path: PathParts, value: Any, /) -> bool: ...


Filter: TypeAlias = type | str | Callable[..., bool] | bool | None | tuple | list | Any
