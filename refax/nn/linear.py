"""Linear layers: :class:`Linear`, :class:`LinearGeneral`, :class:`Einsum` and :class:`Embed`.

Each layer creates its parameters eagerly in ``__init__`` from the ``params`` stream of the
``rngs`` it is given (one key per parameter, in the order kernel then bias), stores them in
``Param`` Variables, and keeps its configuration as plain attributes. Parameters are stored in
``param_dtype``; the computation runs in ``dtype``, or in the dtype JAX's promotion rules give
for the inputs and parameters when ``dtype`` is ``None`` (see :mod:`refax.nn.dtypes`).

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn import Linear
  >>> layer = Linear(3, 4, rngs=Rngs(0))
  >>> layer.kernel.shape, layer.bias.shape
  ((3, 4), (4,))
  >>> layer(jnp.ones((2, 3))).shape
  (2, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from refax._module import Module
from refax._variables import Param, VariableMetadata
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.typing import Dtype, Initializer, PrecisionLike, Shape

if TYPE_CHECKING:
    from refax._rngs import Rngs

__all__ = ["Linear", "LinearGeneral", "Einsum", "Embed"]

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
default_embed_init = initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _as_tuple(x: int | Iterable[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Iterable) else (x,)


def _normalize_axes(axes: Iterable[int], ndim: int, layer: str) -> tuple[int, ...]:
    out = []
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"{layer}: axis {ax} is out of range for inputs of rank {ndim}; pass inputs "
                "with more dimensions or change the layer's axes."
            )
        out.append(ax % ndim)
    return tuple(sorted(out))


def _value(param: Any) -> Any:
    return None if param is None else param[...]


def _call_dot(fn: Callable[..., jax.Array], *args: Any, out_sharding: Any, **kwargs: Any):
    # Custom dot_general / einsum implementations need not accept ``out_sharding``.
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    return fn(*args, **kwargs)


class Linear(Module):
    """A dense layer: ``y = x @ kernel + bias``, contracting the last axis of the inputs.

    Args:
      in_features: size of the last axis of the inputs.
      out_features: size of the last axis of the outputs.
      use_bias: whether to add a bias (Param ``bias`` of shape ``(out_features,)``).
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: dtype of the parameters.
      precision: numerical precision of the matmul (see ``jax.lax.Precision``).
      kernel_init: initializer of the kernel, of shape ``(in_features, out_features)``.
      bias_init: initializer of the bias.
      dot_general: the ``lax.dot_general``-compatible function doing the contraction.
      promote_dtype: function casting ``(inputs, kernel, bias)`` to the computation dtype.
      preferred_element_type: accumulation/output dtype passed to ``dot_general``.
      rngs: random streams; the kernel and bias keys come from ``rngs.params``.
      kernel_metadata: metadata of the ``kernel`` Param (e.g. ``{'sharding_names': ...}``).
      bias_metadata: metadata of the ``bias`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Linear
      >>> layer = Linear(2, 3, use_bias=False, rngs=Rngs(params=0))
      >>> layer.bias is None, layer(jnp.ones((5, 2))).shape
      (True, (5, 3))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        dot_general: Callable[..., jax.Array] = lax.dot_general,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        layer = type(self).__name__
        _checks.positive_int(
            layer,
            "in_features",
            in_features,
            "Pass the size of the inputs' last axis (use LinearGeneral for several axes).",
        )
        _checks.positive_int(
            layer,
            "out_features",
            out_features,
            "Pass the size of the outputs' last axis (use LinearGeneral for several axes).",
        )
        kernel_key = rngs.params()
        self.kernel = Param(
            kernel_init(kernel_key, (in_features, out_features), param_dtype), **kernel_metadata
        )
        self.bias: Param | None = None
        if use_bias:
            bias_key = rngs.params()
            self.bias = Param(bias_init(bias_key, (out_features,), param_dtype), **bias_metadata)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Applies the layer along the last axis of ``inputs``.

        Args:
          inputs: array of shape ``(..., in_features)``.
          out_sharding: optional sharding of the output, passed to ``dot_general``.

        Returns:
          Array of shape ``(..., out_features)``.
        """
        kernel = self.kernel[...]
        shape = np.shape(inputs)
        if len(shape) == 0 or shape[-1] != kernel.shape[0]:
            raise ValueError(
                f"Linear expects inputs whose last axis has size in_features={kernel.shape[0]}, "
                f"got inputs of shape {shape}."
            )
        inputs, kernel, bias = self.promote_dtype(
            (inputs, kernel, _value(self.bias)), dtype=self.dtype
        )
        y = _call_dot(
            self.dot_general,
            inputs,
            kernel,
            (((inputs.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            out_sharding=out_sharding,
        )
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class LinearGeneral(Module):
    """A dense layer contracting any input axes and producing any output feature shape.

    The kernel has shape ``batch_shape + in_features + out_features`` where ``batch_shape``
    lists the sizes in ``batch_axis``. The kernel and bias initializers see the flattened 2-D
    (kernel) or 1-D (bias) shape, so fan-in based initializers scale by the total number of
    contracted elements.

    Args:
      in_features: size(s) of the contracted input axes, in ascending axis order.
      out_features: output feature shape (an int or a tuple).
      axis: input axis or axes to contract (negative values count from the end).
      batch_axis: mapping ``{axis: size}`` of leading input axes that get their own kernel
        slice (batched matmul); the axes must be ``0, 1, ...``.
      use_bias: whether to add a bias of shape ``batch_shape + out_features``.
      dtype: computation dtype (``None``: inferred).
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the kernel.
      bias_init: initializer of the bias.
      precision: numerical precision of the contraction.
      promote_dtype: function casting ``(inputs, kernel, bias)`` to the computation dtype.
      dot_general: custom ``lax.dot_general`` replacement (``None``: ``lax.dot_general``).
      dot_general_cls: class whose instances are used as ``dot_general`` (wins if given).
      preferred_element_type: accumulation/output dtype passed to ``dot_general``.
      rngs: random streams; keys come from ``rngs.params``.
      kernel_metadata: metadata of the ``kernel`` Param.
      bias_metadata: metadata of the ``bias`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import LinearGeneral
      >>> layer = LinearGeneral((4, 5), (2, 3), axis=(-2, -1), rngs=Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((7, 4, 5))).shape
      ((4, 5, 2, 3), (7, 2, 3))
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        batch_axis: Mapping[int, int] = _NO_METADATA,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        precision: PrecisionLike = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        dot_general: Callable[..., jax.Array] | None = None,
        dot_general_cls: Callable[[], Callable[..., jax.Array]] | None = None,
        preferred_element_type: Dtype | None = None,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_linear_general(in_features, out_features, axis, batch_axis)
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.axis = _as_tuple(axis)
        self.batch_axis = dict(batch_axis)
        if len(self.axis) != len(self.in_features):
            raise ValueError(
                "LinearGeneral: in_features and axis must have the same length. Got "
                f"{self.in_features} and {self.axis}."
            )
        if self.batch_axis:
            batch_dims = tuple(self.batch_axis)
            if set(batch_dims) != set(range(max(batch_dims) + 1)):
                raise ValueError(
                    f"LinearGeneral: batch_dims {batch_dims} must be consecutive leading "
                    "dimensions starting from 0."
                )
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.dot_general = dot_general
        self.dot_general_cls = dot_general_cls
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

        batch_shape = tuple(self.batch_axis.values())
        n_batch = int(np.prod(batch_shape))
        n_in = int(np.prod(self.in_features))
        n_out = int(np.prod(self.out_features))
        kernel_shape = batch_shape + self.in_features + self.out_features
        kernel = kernel_init(rngs.params(), (n_batch * n_in, n_out), param_dtype)
        self.kernel = Param(_reshape_init(kernel, kernel_shape), **kernel_metadata)
        self.bias: Param | None = None
        if use_bias:
            bias_shape = batch_shape + self.out_features
            bias = bias_init(rngs.params(), (n_batch * n_out,), param_dtype)
            self.bias = Param(_reshape_init(bias, bias_shape), **bias_metadata)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Contracts ``axis`` of ``inputs`` with the kernel.

        Returns:
          Array of shape ``batch_shape + remaining input axes + out_features``.
        """
        inputs = jnp.asarray(inputs)
        ndim = inputs.ndim
        n_batch = len(self.batch_axis)
        axis = _normalize_axes(self.axis, ndim, "LinearGeneral")
        batch_axis = _normalize_axes(self.batch_axis, ndim, "LinearGeneral")
        kernel = self.kernel[...]
        expected = tuple(kernel.shape[: n_batch + len(axis)])
        given = tuple(inputs.shape[ax] for ax in batch_axis + axis)
        if expected != given:
            raise ValueError(
                f"LinearGeneral expects inputs of size {expected} along (batch) axes "
                f"{batch_axis + axis}, got inputs of shape {inputs.shape}."
            )
        inputs, kernel, bias = self.promote_dtype(
            (inputs, kernel, _value(self.bias)), dtype=self.dtype
        )
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        elif self.dot_general is not None:
            dot_general = self.dot_general
        else:
            dot_general = lax.dot_general
        batch_ind = tuple(range(n_batch))
        contract_ind = tuple(range(n_batch, n_batch + len(axis)))
        out = _call_dot(
            dot_general,
            inputs,
            kernel,
            ((axis, contract_ind), (batch_axis, batch_ind)),
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            out_sharding=out_sharding,
        )
        if bias is not None:
            expanded = tuple(
                inputs.shape[ax] if ax in batch_axis else 1 for ax in range(ndim) if ax not in axis
            )
            out += jnp.reshape(bias, expanded + self.out_features)
        return out


def _check_linear_general(in_features: Any, out_features: Any, axis: Any, batch_axis: Any) -> None:
    layer = "LinearGeneral"
    _checks.positive_ints(
        layer,
        "in_features",
        in_features,
        "Pass the sizes of the contracted input axes, one per entry of axis.",
    )
    _checks.positive_ints(
        layer, "out_features", out_features, "Pass the output feature shape (an int or a tuple)."
    )
    axes = (axis,) if _checks.is_int(axis) else axis
    if not isinstance(axes, Iterable) or not all(_checks.is_int(a) for a in axes):
        raise TypeError(
            f"LinearGeneral: axis must be an integer or a sequence of integers, got {axis!r}. "
            "Pass the input axes to contract (negative values count from the end)."
        )
    if not isinstance(batch_axis, Mapping):
        raise TypeError(
            "LinearGeneral: batch_axis must be a mapping {axis: size}, got "
            f"{batch_axis!r} of type {type(batch_axis).__name__}. Pass e.g. {{0: batch_size}}."
        )
    for ax, size in batch_axis.items():
        if not _checks.is_int(ax):
            raise TypeError(
                f"LinearGeneral: batch_axis keys must be integer axes, got {ax!r} in "
                f"{dict(batch_axis)!r}."
            )
        _checks.positive_int(
            layer, f"batch_axis[{ax}]", size, "Pass the size of that leading input axis."
        )


def _reshape_init(value: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(value, VariableMetadata):
        return VariableMetadata(jnp.reshape(value.raw_value, shape), value.metadata)
    return jnp.reshape(value, shape)


def _check_einsum_str(einsum_str: str) -> None:
    if "->" not in einsum_str:
        raise ValueError(
            f'Einsum: `einsum_str` equation must be explicit and include "->", got {einsum_str!r}.'
        )
    n_commas = einsum_str.count(",")
    if n_commas != 1:
        raise ValueError(
            "Einsum: `einsum_str` equation must have exactly two operands and therefore, "
            f"exactly one comma character, instead of {n_commas} (got {einsum_str!r})."
        )


def _check_kernel_rank(einsum_str: str, kernel_shape: Any) -> None:
    kernel_labels = einsum_str.split("->")[0].split(",")[1]
    n_labels = len(kernel_labels.replace("...", ""))
    rank = len(kernel_shape)
    wrong = rank < n_labels if "..." in kernel_labels else rank != n_labels
    if wrong:
        raise ValueError(
            f"Einsum: kernel_shape {tuple(kernel_shape)} has rank {rank}, but the kernel "
            f"operand {kernel_labels!r} of {einsum_str!r} has {n_labels} labels. Give "
            "kernel_shape one size per kernel label."
        )


class Einsum(Module):
    """A layer applying a learnable kernel (and optional bias) through an einsum equation.

    Args:
      einsum_str: an explicit two-operand equation ``'inputs,kernel->outputs'``.
      kernel_shape: shape of the kernel.
      bias_shape: shape of the bias (an int for a 1-D bias; ``None``: no bias). The bias is
        broadcast against the output by the labels it shares with the kernel (dims matched by
        ``...`` included).
      dtype: computation dtype (``None``: inferred).
      param_dtype: dtype of the parameters.
      precision: numerical precision of the einsum.
      kernel_init: initializer of the kernel.
      bias_init: initializer of the bias.
      promote_dtype: function casting ``(inputs, kernel, bias)`` to the computation dtype.
      einsum_op: the ``jnp.einsum``-compatible function to call.
      preferred_element_type: accumulation/output dtype passed to ``einsum_op``.
      rngs: random streams; keys come from ``rngs.params``.
      kernel_metadata: metadata of the ``kernel`` Param.
      bias_metadata: metadata of the ``bias`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Einsum
      >>> layer = Einsum('btd,dnh->btnh', (8, 2, 4), (2, 4), rngs=Rngs(0))
      >>> layer(jnp.ones((3, 5, 8))).shape
      (3, 5, 2, 4)
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Shape,
        bias_shape: Shape | None = None,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        einsum_op: Callable[..., jax.Array] = jnp.einsum,
        preferred_element_type: Dtype | None = None,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        if not isinstance(einsum_str, str):
            raise TypeError(
                f"Einsum: einsum_str must be a string, got {einsum_str!r} of type "
                f"{type(einsum_str).__name__}. Pass an equation such as 'btd,dh->bth'."
            )
        einsum_str = einsum_str.replace(" ", "")
        _check_einsum_str(einsum_str)
        kernel_dims = _checks.positive_ints(
            "Einsum", "kernel_shape", kernel_shape, "Pass the kernel's shape.", allow_int=False
        )
        bias_dims = _checks.positive_ints(
            "Einsum",
            "bias_shape",
            bias_shape,
            "Pass the bias's shape (an int for a 1-D bias), or None for no bias.",
            allow_none=True,
        )
        _check_kernel_rank(einsum_str, kernel_dims)
        self.kernel = Param(
            kernel_init(rngs.params(), tuple(kernel_shape), param_dtype), **kernel_metadata
        )
        self.bias: Param | None = None
        if bias_dims is not None:
            bias_dims = tuple(int(d) for d in bias_dims)
            self.bias = Param(bias_init(rngs.params(), bias_dims, param_dtype), **bias_metadata)
        self.einsum_str = einsum_str
        self.kernel_shape = tuple(kernel_shape)
        self.bias_shape = bias_dims
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.einsum_op = einsum_op
        self.preferred_element_type = preferred_element_type

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        """Applies ``einsum_str`` (default: the constructor's) to ``inputs`` and the kernel."""
        einsum_str = (self.einsum_str if einsum_str is None else einsum_str).replace(" ", "")
        _check_einsum_str(einsum_str)
        inputs = jnp.asarray(inputs)
        kernel = self.kernel[...]
        lhs, out_labels = einsum_str.split("->")
        in_labels, kernel_labels = lhs.split(",")
        if "." not in in_labels and len(in_labels) != inputs.ndim:
            raise ValueError(
                f"Einsum: equation {einsum_str!r} expects inputs of rank {len(in_labels)} "
                f"({in_labels!r}), got inputs of shape {inputs.shape}."
            )
        if "." not in in_labels + kernel_labels:
            sizes = dict(zip(kernel_labels, kernel.shape))
            for label, size in zip(in_labels, inputs.shape):
                if label in sizes and sizes[label] != size:
                    raise ValueError(
                        f"Einsum: label {label!r} of {einsum_str!r} has size {sizes[label]} in "
                        f"the kernel of shape {kernel.shape} but {size} in inputs of shape "
                        f"{inputs.shape}."
                    )
        inputs, kernel, bias = self.promote_dtype(
            (inputs, kernel, _value(self.bias)), dtype=self.dtype
        )
        y = _call_dot(
            self.einsum_op,
            einsum_str,
            inputs,
            kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            out_sharding=out_sharding,
        )
        if bias is not None:
            y += jnp.reshape(
                bias, _bias_broadcast_shape(out_labels, kernel_labels, kernel.shape, y.ndim)
            )
        return y


def _split_ellipsis(labels: str, ndim: int) -> tuple[str, int, str]:
    """``(labels before '...', number of dims '...' stands for, labels after '...')``."""
    if "..." not in labels:
        return labels, 0, ""
    pre, post = labels.split("...")
    return pre, ndim - len(pre) - len(post), post


def _bias_broadcast_shape(
    out_labels: str, kernel_labels: str, kernel_shape: tuple[int, ...], ndim: int
) -> tuple[int, ...]:
    """The bias reshaped to broadcast against the output: kernel sizes where the kernel has the
    output's dim, 1 elsewhere.

    Dims matched by ``...`` broadcast right-aligned, so the kernel's ``...`` dims are the last
    ones of the output's ``...`` dims.
    """
    k_pre, k_ell, k_post = _split_ellipsis(kernel_labels, len(kernel_shape))
    sizes = dict(zip(k_pre, kernel_shape))
    sizes.update(zip(k_post, kernel_shape[len(kernel_shape) - len(k_post) :]))
    ellipsis_sizes = kernel_shape[len(k_pre) : len(k_pre) + k_ell]
    o_pre, o_ell, o_post = _split_ellipsis(out_labels, ndim)
    middle = (1,) * (o_ell - k_ell) + tuple(ellipsis_sizes) if o_ell else ()
    return tuple(sizes.get(c, 1) for c in o_pre) + middle + tuple(sizes.get(c, 1) for c in o_post)


class Embed(Module):
    """An embedding table: maps integer ids to rows of a ``(num_embeddings, features)`` Param.

    Args:
      num_embeddings: number of rows (vocabulary size).
      features: size of each embedding vector.
      dtype: computation dtype of lookups and ``attend`` (``None``: ``param_dtype``).
      param_dtype: dtype of the table.
      embedding_init: initializer of the table.
      promote_dtype: function casting arrays to the computation dtype.
      rngs: random streams; the key comes from ``rngs.params``.
      embedding_metadata: metadata of the ``embedding`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Embed
      >>> embed = Embed(10, 4, rngs=Rngs(0))
      >>> embed(jnp.array([[1, 2, 3]])).shape
      (1, 3, 4)
      >>> embed.attend(jnp.ones((2, 4))).shape  # logits over the vocabulary
      (2, 10)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        embedding_init: Initializer = default_embed_init,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        embedding_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _checks.positive_int(
            "Embed", "num_embeddings", num_embeddings, "Pass the vocabulary size (number of ids)."
        )
        _checks.positive_int(
            "Embed", "features", features, "Pass the size of each embedding vector."
        )
        self.embedding = Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
            **embedding_metadata,
        )
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype if dtype is not None else param_dtype
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Looks up ``inputs`` (integers of any shape) in the table.

        Ids out of range give NaN rows (negative ids count from the end), like ``jnp.take``.

        Returns:
          Array of shape ``inputs.shape + (features,)``.
        """
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                "Embed: input type must be an integer or unsigned integer, got "
                f"{inputs.dtype}. Cast the ids with jnp.asarray(ids, jnp.int32)."
            )
        (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
        if embedding.shape[0] == 1:
            return jnp.broadcast_to(embedding, inputs.shape + embedding.shape[1:])
        if out_sharding is not None:
            return embedding.at[inputs].get(mode="fill", out_sharding=out_sharding)
        return jnp.take(embedding, inputs, axis=0)

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Dot products of ``query`` with every embedding (e.g. tied output logits).

        Args:
          query: array of shape ``(..., features)``.
          out_sharding: optional sharding of the output.

        Returns:
          Array of shape ``(..., num_embeddings)``.
        """
        embedding = self.embedding[...]
        shape = np.shape(query)
        if len(shape) == 0 or shape[-1] != embedding.shape[-1]:
            raise ValueError(
                f"Embed.attend expects a query whose last axis has size features="
                f"{embedding.shape[-1]}, got shape {shape}."
            )
        query, embedding = self.promote_dtype((query, embedding), dtype=self.dtype)
        if out_sharding is not None:
            return jnp.dot(query, embedding.T, out_sharding=out_sharding)
        return jnp.dot(query, embedding.T)


def __getattr__(name: str) -> Any:
    # ``linear.canonicalize_padding`` is where the reference API documents the helper; it
    # lives with the convolutions (imported lazily so this module does not depend on them).
    if name == "canonicalize_padding":
        from refax.nn.conv import canonicalize_padding

        return canonicalize_padding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
