"""Type aliases for annotating code that uses refax (``refax.typing``).

These are the names user code imports to annotate layer arguments, parameter trees and
sharding specs, under the names the reference NNX API documents (``PaddingLike``, ``Dtype``,
``PrecisionLike``, ...). They are plain aliases and ``Protocol``s: nothing here is checked at
run time, and importing this module pulls in nothing of refax.

Example:
  >>> import jax.numpy as jnp
  >>> from refax.typing import Dtype, PaddingLike, Shape
  >>> def describe(shape: Shape, dtype: Dtype, padding: PaddingLike = 'SAME') -> str:
  ...     return f'{tuple(shape)} {jnp.dtype(dtype).name} {padding}'
  >>> describe([2, 3], jnp.float32)
  '(2, 3) float32 SAME'
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import jax
import numpy as np

A = TypeVar("A")

# --- Arrays, keys and shapes -----------------------------------------------------------------

#: A JAX array (the value of a Variable, an input or an output of a layer).
Array: TypeAlias = jax.Array
#: A value accepted where an array is expected: an array or a Python scalar.
ArrayLike: TypeAlias = jax.Array | np.ndarray | float | int | bool
#: A JAX random key (typed ``jax.random.key`` or raw ``PRNGKey`` array).
PRNGKey: TypeAlias = jax.Array
#: The key an ``Rngs`` stream hands out.
RngValue: TypeAlias = jax.Array
#: Random keys by stream name, e.g. ``{'params': key, 'dropout': key}``.
RNGSequences: TypeAlias = dict[str, PRNGKey]
#: What can be folded into a key: a counter or a stream name.
PRNGFoldable: TypeAlias = int | str
#: A dtype specification: ``jnp.float32``, ``np.dtype('int8')``, ``'bfloat16'``, ``float`` ...
Dtype: TypeAlias = Any
#: An array shape, one non-negative size per axis.
Shape: TypeAlias = Sequence[int]
#: One or several axes (negative values count from the end).
Axes: TypeAlias = int | Sequence[int]
#: A single axis, or ``None`` for "no axis" (e.g. a broadcast argument of ``vmap``).
Axis: TypeAlias = int | None

# --- Paths in a graph of objects -------------------------------------------------------------

#: One step of a path: an attribute name, a dict key or a list index.
Key: TypeAlias = Hashable
#: A path from a root object to a value, as its steps: ``('encoder', 'layers', 0, 'kernel')``.
PathParts: TypeAlias = tuple[Key, ...]
#: A path written as one string, e.g. ``'encoder/layers/0/kernel'``.
Path: TypeAlias = str
#: A leaf of a State or pytree (an array, a Variable, or any other value).
Leaf: TypeAlias = Any

# --- Layer configuration ---------------------------------------------------------------------

#: Numerical precision of a matmul or convolution: ``None`` (default), a ``lax.Precision`` or
#: its name (``'highest'``), or one of them for each of the two operands.
PrecisionLike: TypeAlias = (
    None | str | jax.lax.Precision | tuple[str, str] | tuple[jax.lax.Precision, jax.lax.Precision]
)
#: Padding a user gives a convolution: a mode string (``'SAME'``, ``'VALID'``, ``'CIRCULAR'``
#: ...), one int for every side of every spatial dim, or one int or ``(low, high)`` pair per
#: spatial dim.
PaddingLike: TypeAlias = str | int | Sequence[int | tuple[int, int]]
#: Padding in the form ``jax.lax`` convolutions take: a string or one ``(low, high)`` pair per
#: spatial dim (see ``refax.nn.conv.canonicalize_padding``).
LaxPadding: TypeAlias = str | Sequence[tuple[int, int]]
#: A ``jax.lax.dot_general``-compatible function (the ``dot_general=`` of dense layers).
DotGeneralT: TypeAlias = Callable[..., jax.Array]
#: A ``jax.lax.conv_general_dilated``-compatible function (``Conv(conv_general_dilated=...)``).
ConvGeneralDilatedT: TypeAlias = Callable[..., jax.Array]
#: A ``jnp.einsum``-compatible function (``Einsum(einsum_op=...)``).
EinsumT: TypeAlias = Callable[..., jax.Array]


class Initializer(Protocol):
    """``init(key, shape, dtype) -> Array``: creates a parameter value."""

    def __call__(self, key: jax.Array, shape: Shape, dtype: Dtype = ...) -> jax.Array: ...


class PromoteDtypeFn(Protocol):
    """``promote(args, *, dtype=None, inexact=True) -> tuple``: casts a layer's operands.

    Layers call it with their operands (``None`` entries pass through) and use the tuple it
    returns, one entry per operand, all in the computation dtype (see
    ``refax.nn.dtypes.promote_dtype``).
    """

    def __call__(
        self, args: Sequence[Any], /, *, dtype: Dtype | None = None, inexact: bool = True
    ) -> tuple[Any, ...]: ...


class ShapeDtype(Protocol):
    """Anything with a ``shape`` and a ``dtype`` (arrays, ``jax.ShapeDtypeStruct``)."""

    shape: Shape
    dtype: Dtype


# --- Trees of parameters ---------------------------------------------------------------------

#: The values of one kind of variable by name, e.g. ``{'kernel': ..., 'bias': ...}``.
Collection: TypeAlias = Mapping[str, Any]
#: A :data:`Collection` that may be modified in place.
MutableCollection: TypeAlias = dict[str, Any]
#: Collections by kind, e.g. ``{'params': {...}, 'batch_stats': {...}}``.
VariableDict: TypeAlias = Mapping[str, Collection]
#: A :data:`VariableDict` that is not to be modified (any read-only mapping).
FrozenVariableDict: TypeAlias = Mapping[str, Collection]
#: A :data:`VariableDict` that may be modified in place.
MutableVariableDict: TypeAlias = dict[str, MutableCollection]
#: Any pytree whose leaves are arrays.
ArrayPytree: TypeAlias = Any

# --- Sharding --------------------------------------------------------------------------------

#: A mesh axis name, several of them (the dim is split over all), or ``None`` (replicated).
AxisName: TypeAlias = str | tuple[str, ...] | None
#: One mesh axis name (or ``None``) per array dim, as in ``out_sharding`` metadata.
Sharding: TypeAlias = tuple[AxisName, ...]
#: Logical (model-level) axis names, one per array dim.
LogicalNames: TypeAlias = tuple[str | None, ...]
#: Rules mapping logical axis names to mesh axis names.
LogicalRules: TypeAlias = Sequence[tuple[str, AxisName]]
#: A partition spec written with logical axis names.
LogicalPartitionSpec: TypeAlias = Any
#: A pytree of :data:`LogicalPartitionSpec`.
LogicalPartitionSpecPytree: TypeAlias = Any
#: A pytree of ``jax.sharding.PartitionSpec``.
PartitionSpecPytree: TypeAlias = Any

# --- Filters ---------------------------------------------------------------------------------


class FilterPredicate(Protocol):
    """``predicate(path, value) -> bool``: the compiled form of every filter."""

    def __call__(self, path: PathParts, value: Any, /) -> bool: ...


#: What selects Variables in ``split``, ``state``, ``grad(argnums=DiffState(...))`` ...: a
#: Variable type, a tag string, a predicate, ``True``/``False``/``...``, or a list/tuple of them.
Filter: TypeAlias = type | str | Callable[..., bool] | bool | None | tuple | list | Any
