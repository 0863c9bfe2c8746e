"""Attention: :class:`MultiHeadAttention`, the dot-product attention functions and mask helpers.

Dot-product attention (Vaswani et al., 2017) mixes the ``value`` vectors of every key position
with weights ``softmax(q · k / sqrt(depth))``, computed per head. Arrays use the layout
``[batch..., length, heads, depth]``; attention weights, masks and biases use
``[batch..., heads, q_length, kv_length]``. A mask is a boolean (or 0/1) array broadcastable to
the weights' shape: positions where it is False get (practically) zero weight.

Grouped-query attention is supported: keys and values may have fewer heads than the queries
(their count must divide the query head count); query head ``h`` then attends with key/value head
``h // (q_heads // kv_heads)``.

:class:`MultiHeadAttention` projects its inputs to queries, keys and values with three
``LinearGeneral`` layers (``query``, ``key``, ``value``), optionally normalises queries and keys
(``query_ln``/``key_ln``), runs ``attention_fn`` and projects the heads back with ``out``. For
autoregressive decoding, :meth:`MultiHeadAttention.init_cache` allocates ``Cache`` Variables
that each ``decode=True`` call (one token at a time) fills in place.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn.attention import MultiHeadAttention, make_causal_mask
  >>> layer = MultiHeadAttention(num_heads=2, in_features=4, decode=False, rngs=Rngs(0))
  >>> x = jnp.ones((2, 3, 4))  # (batch, length, features)
  >>> layer(x, mask=make_causal_mask(jnp.ones((2, 3)))).shape
  (2, 3, 4)
  >>> layer.query.kernel.shape  # (in_features, num_heads, head_dim)
  (4, 2, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from refax._module import Module
from refax._object import data
from refax._rngs import Rngs, RngStream
from refax._variables import Cache, Intermediate
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.nn.linear import LinearGeneral, default_kernel_init
from refax.nn.normalization import LayerNorm
from refax.typing import Dtype, Initializer, PrecisionLike, Shape

__all__ = [
    "MultiHeadAttention",
    "dot_product_attention",
    "dot_product_attention_weights",
    "make_attention_mask",
    "make_causal_mask",
    "combine_masks",
]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
default_bias_init = initializers.zeros_init()
DotGeneralFn = Callable[..., jax.Array]


# -- shape checks ----------------------------------------------------------------------------
def _check_qkv(query: jax.Array, key: jax.Array, value: jax.Array | None = None) -> None:
    arrays = [("query", query), ("key", key)] + ([("value", value)] if value is not None else [])
    names = ", ".join(n for n, _ in arrays)
    shapes = ", ".join(str(a.shape) for _, a in arrays)
    if any(a.ndim < 3 for _, a in arrays):
        raise ValueError(
            f"Attention expects {names} of shape [batch..., length, heads, depth] (rank >= 3), "
            f"got shapes {shapes}."
        )
    if len({a.ndim for _, a in arrays}) != 1:
        raise ValueError(f"Attention: {names} must have the same rank, got shapes {shapes}.")
    if len({a.shape[:-3] for _, a in arrays}) != 1:
        raise ValueError(f"Attention: {names} batch dims must match, got shapes {shapes}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"Attention: query and key depths must match, got {query.shape[-1]} and "
            f"{key.shape[-1]} (shapes {query.shape} and {key.shape})."
        )
    if value is not None:
        if key.shape[-3] != value.shape[-3]:
            raise ValueError(
                f"Attention: key and value lengths must match, got {key.shape[-3]} and "
                f"{value.shape[-3]} (shapes {key.shape} and {value.shape})."
            )
        if key.shape[-2] != value.shape[-2]:
            raise ValueError(
                f"Attention: key and value must have the same number of heads, got "
                f"{key.shape[-2]} and {value.shape[-2]}."
            )
    if query.shape[-2] % key.shape[-2] != 0:
        raise ValueError(
            f"Attention: the number of query heads ({query.shape[-2]}) must be a multiple of "
            f"the number of key/value heads ({key.shape[-2]}) for grouped-query attention."
        )


def _apply_mask(weights: jax.Array, mask: jax.Array | None, is_causal: bool) -> jax.Array:
    if mask is None and not is_causal:
        return weights
    keep = jnp.ones((), dtype=bool) if mask is None else jnp.asarray(mask).astype(bool)
    if is_causal:
        q_len, kv_len = weights.shape[-2:]
        keep = jnp.logical_and(keep, jnp.tril(jnp.ones((q_len, kv_len), dtype=bool)))
    return jnp.where(keep, weights, jnp.finfo(weights.dtype).min)


# -- functions ------------------------------------------------------------------------------
def dot_product_attention_weights(
    query: jax.Array,
    key: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    module: Module | None = None,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    is_causal: bool = False,
) -> jax.Array:
    """Computes the attention weights ``softmax(q · k / sqrt(depth) + bias)``.

    Masked-out logits are replaced by the most negative finite value of the computation dtype
    before the softmax (a fully masked row therefore gets uniform weights).

    Args:
      query: array of shape ``[batch..., q_length, num_heads, depth]``.
      key: array of shape ``[batch..., kv_length, num_kv_heads, depth]``; ``num_kv_heads``
        must divide ``num_heads``.
      bias: added to the logits; broadcastable to ``[batch..., num_heads, q_length,
        kv_length]``.
      mask: boolean mask broadcastable to the weights' shape; False entries are masked out.
      broadcast_dropout: share one dropout mask across the batch and head dimensions.
      dropout_rng: key of the dropout mask (required when dropout is active).
      dropout_rate: probability of dropping a weight.
      deterministic: True disables dropout.
      dtype: computation dtype (``None``: inferred from ``query`` and ``key``).
      precision: precision of the ``q · k`` contraction.
      module: when given, the weights (before dropout) are sown into it as the
        ``Intermediate`` ``attention_weights``.
      promote_dtype: function casting ``(query, key)`` to the computation dtype.
      is_causal: additionally mask out keys after each query position (``tril``).

    Returns:
      Array of shape ``[batch..., num_heads, q_length, kv_length]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.attention import dot_product_attention_weights
      >>> q = k = jnp.ones((2, 3, 2, 2))  # (batch, length, heads, depth)
      >>> w = dot_product_attention_weights(q, k, is_causal=True)
      >>> w.shape, w[0, 0, 1].tolist()
      ((2, 2, 3, 3), [0.5, 0.5, 0.0])
    """
    query, key = promote_dtype((query, key), dtype=dtype)
    dtype = query.dtype
    _check_qkv(query, key)
    heads, kv_heads, depth = query.shape[-2], key.shape[-2], query.shape[-1]
    groups = heads // kv_heads
    query = query / jnp.sqrt(depth).astype(dtype)
    # query head h = kv_head * groups + g uses key head kv_head.
    query = query.reshape(query.shape[:-2] + (kv_heads, groups, depth))
    weights = jnp.einsum("...qhgd,...khd->...hgqk", query, key, precision=precision)
    weights = weights.reshape(weights.shape[:-4] + (heads,) + weights.shape[-2:])
    if bias is not None:
        weights = weights + bias
    weights = _apply_mask(weights, mask, is_causal)
    weights = jax.nn.softmax(weights).astype(dtype)

    if module is not None:
        module.sow(Intermediate, "attention_weights", weights)

    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(
                f"dot_product_attention_weights: dropout_rate={dropout_rate} with "
                "deterministic=False needs a `dropout_rng` key; pass one or set "
                "deterministic=True."
            )
        keep_prob = 1.0 - dropout_rate
        if broadcast_dropout:  # one mask for every batch entry and head
            shape = (1,) * (weights.ndim - 2) + weights.shape[-2:]
        else:
            shape = weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    return weights


def _flatten_batch(x: jax.Array | None, batch_shape: tuple[int, ...], ndim: int):
    """Broadcasts ``x``'s batch dims to ``batch_shape`` and merges them into one axis."""
    if x is None:
        return None
    x = jnp.asarray(x)
    x = jnp.expand_dims(x, tuple(range(max(ndim - x.ndim, 0))))
    x = jnp.broadcast_to(x, batch_shape + x.shape[-3:])
    return x.reshape((math.prod(batch_shape),) + x.shape[-3:])


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    module: Module | None = None,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    is_causal: bool = False,
) -> jax.Array:
    """Computes dot-product attention: ``softmax(q · k / sqrt(depth) + bias) · v`` per head.

    When dropout is inactive, no weights are sown and ``precision`` is the default, the
    computation is delegated to :func:`jax.nn.dot_product_attention` (which may pick a fused
    kernel); otherwise it goes through :func:`dot_product_attention_weights`.

    Args:
      query: array of shape ``[batch..., q_length, num_heads, depth]``.
      key: array of shape ``[batch..., kv_length, num_kv_heads, depth]``.
      value: array of shape ``[batch..., kv_length, num_kv_heads, v_depth]``.
      bias: added to the logits; broadcastable to ``[batch..., num_heads, q_length,
        kv_length]``.
      mask: boolean mask broadcastable to ``[batch..., num_heads, q_length, kv_length]``;
        False entries are masked out.
      broadcast_dropout: share one dropout mask across the batch and head dimensions.
      dropout_rng: key of the dropout mask.
      dropout_rate: probability of dropping an attention weight.
      deterministic: True disables dropout.
      dtype: computation dtype (``None``: inferred from the inputs).
      precision: precision of the contractions.
      module: when given, the attention weights are sown into it (``attention_weights``).
      promote_dtype: function casting ``(query, key, value)`` to the computation dtype.
      is_causal: additionally apply a causal (lower-triangular) mask.

    Returns:
      Array of shape ``[batch..., q_length, num_heads, v_depth]``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from refax.nn.attention import dot_product_attention
      >>> q, k, v = jnp.sin(jnp.arange(72.0)).reshape(3, 2, 3, 2, 2)
      >>> out = dot_product_attention(q, k, v)
      >>> w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(2.0))
      >>> bool(jnp.allclose(out, jnp.einsum('bhqk,bkhd->bqhd', w, v), atol=1e-6))
      True
    """
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    dtype = query.dtype
    _check_qkv(query, key, value)

    dropout_active = not deterministic and dropout_rate > 0.0
    max_rank = max(query.ndim, 4)  # what jax.nn.dot_product_attention can broadcast
    fast = (
        not dropout_active
        and module is None
        and precision is None
        and key.shape[-1] == value.shape[-1]
        and (bias is None or jnp.ndim(bias) <= max_rank)
        and (mask is None or jnp.ndim(mask) <= max_rank)
    )
    if fast:
        out_shape = query.shape[:-1] + (value.shape[-1],)
        if query.ndim > 4:
            batch_shape = query.shape[:-3]
            query, key, value = (
                _flatten_batch(x, batch_shape, x.ndim) for x in (query, key, value)
            )
            bias = _flatten_batch(bias, batch_shape, len(out_shape))
            mask = _flatten_batch(mask, batch_shape, len(out_shape))
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
        out = jax.nn.dot_product_attention(query, key, value, bias, mask, is_causal=is_causal)
        return out.reshape(out_shape)

    weights = dot_product_attention_weights(
        query,
        key,
        bias,
        mask,
        broadcast_dropout,
        dropout_rng,
        dropout_rate,
        deterministic,
        dtype,
        precision,
        module,
        promote_dtype,
        is_causal,
    )
    heads, kv_heads = weights.shape[-3], value.shape[-2]
    groups = heads // kv_heads
    weights = weights.reshape(weights.shape[:-3] + (kv_heads, groups) + weights.shape[-2:])
    out = jnp.einsum("...hgqk,...khd->...qhgd", weights, value, precision=precision)
    return out.reshape(out.shape[:-3] + (heads, value.shape[-1]))


# -- masks ----------------------------------------------------------------------------------
def make_attention_mask(
    query_input: jax.Array,
    key_input: jax.Array,
    pairwise_fn: Callable[..., Any] = jnp.multiply,
    extra_batch_dims: int = 0,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Builds a ``[batch..., 1, q_length, kv_length]`` mask from per-position inputs.

    Entry ``[..., 0, i, j]`` is ``pairwise_fn(query_input[..., i], key_input[..., j])``.

    Args:
      query_input: array of shape ``[batch..., q_length]`` (e.g. a padding indicator).
      key_input: array of shape ``[batch..., kv_length]``.
      pairwise_fn: broadcasting elementwise function combining the two.
      extra_batch_dims: number of leading singleton axes to add.
      dtype: dtype of the mask.

    Returns:
      The mask, with a singleton heads axis.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.attention import make_attention_mask
      >>> tokens = jnp.array([[5, 7, 0]])  # 0 is padding
      >>> make_attention_mask(tokens > 0, tokens > 0)[0, 0]
      Array([[1., 1., 0.],
             [1., 1., 0.],
             [0., 0., 0.]], dtype=float32)
    """
    mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
    mask = jnp.expand_dims(mask, -3)
    mask = jnp.expand_dims(mask, tuple(range(extra_batch_dims)))
    return mask.astype(dtype)


def make_causal_mask(
    x: jax.Array, extra_batch_dims: int = 0, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Builds a causal self-attention mask ``[batch..., 1, length, length]`` for ``x``.

    Position ``i`` may attend to positions ``j <= i``. Only the shape of ``x``
    (``[batch..., length]``) is used.

    Args:
      x: array of shape ``[batch..., length]``.
      extra_batch_dims: number of leading singleton axes to add.
      dtype: dtype of the mask.

    Returns:
      The lower-triangular mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.attention import make_causal_mask
      >>> make_causal_mask(jnp.ones((1, 3)))[0, 0]
      Array([[1., 0., 0.],
             [1., 1., 0.],
             [1., 1., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    positions = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(
        positions, positions, jnp.greater_equal, extra_batch_dims=extra_batch_dims, dtype=dtype
    )


def combine_masks(*masks: jax.Array | None, dtype: Dtype = jnp.float32) -> jax.Array | None:
    """Combines masks with a logical and, ignoring ``None`` entries.

    Args:
      *masks: masks of the same rank (broadcastable to each other), or None.
      dtype: dtype of the result.

    Returns:
      The combined mask, or None if every mask is None.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn.attention import combine_masks
      >>> combine_masks(jnp.array([1, 1, 0]), None, jnp.array([True, False, True]))
      Array([1., 0., 0.], dtype=float32)
    """
    present = [jnp.asarray(m) for m in masks if m is not None]
    if not present:
        return None
    if len({m.ndim for m in present}) != 1:
        raise ValueError(
            f"combine_masks: masks must have the same rank, got shapes "
            f"{tuple(m.shape for m in present)}; add singleton axes to the lower-rank masks."
        )
    mask = present[0]
    for other in present[1:]:
        mask = jnp.logical_and(mask, other)
    return mask.astype(dtype)


# -- layer ----------------------------------------------------------------------------------
def _first_from(name: str, hint: str, *values: bool | None) -> bool:
    for v in values:
        if v is not None:
            return v
    raise ValueError(
        f"No `{name}` argument was provided to MultiHeadAttention: pass `{name}=True/False` "
        f"to the constructor or to __call__{hint}."
    )


def _check_attention_config(
    num_heads: Any,
    in_features: Any,
    qkv_features: Any,
    out_features: Any,
    num_kv_heads: Any,
    in_kv_features: Any,
    dropout_rate: Any,
) -> None:
    layer = "MultiHeadAttention"
    _checks.positive_int(layer, "num_heads", num_heads, "Pass the number of query heads.")
    _checks.positive_int(
        layer, "in_features", in_features, "Pass the size of the last axis of inputs_q."
    )
    for name, value, fix in (
        ("qkv_features", qkv_features, "Pass the total query/key/value size, or None."),
        ("out_features", out_features, "Pass the output size, or None for in_features."),
        ("num_kv_heads", num_kv_heads, "Pass the number of key/value heads, or None."),
        ("in_kv_features", in_kv_features, "Pass the size of the key/value inputs, or None."),
    ):
        _checks.positive_int(layer, name, value, fix, optional=True)
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv_heads != 0:
        raise ValueError(
            f"MultiHeadAttention: num_heads ({num_heads}) must be divisible by num_kv_heads "
            f"({kv_heads}). Pass a num_kv_heads that divides num_heads (each key/value head "
            "serves num_heads // num_kv_heads query heads)."
        )
    qkv = in_features if qkv_features is None else qkv_features
    if qkv % num_heads != 0:
        raise ValueError(
            f"MultiHeadAttention: qkv_features ({qkv}) must be divisible by num_heads "
            f"({num_heads}); each head gets qkv_features // num_heads features. Pass a "
            "qkv_features that is a multiple of num_heads (it defaults to in_features)."
        )
    _checks.fraction(
        layer,
        "dropout_rate",
        dropout_rate,
        "It is the probability of dropping an attention weight; 1 would drop them all.",
    )


class MultiHeadAttention(Module):
    """Multi-head (and grouped-query) dot-product attention.

    Inputs are projected to ``num_heads`` queries and ``num_kv_heads`` keys/values of size
    ``head_dim = qkv_features // num_heads`` by the ``LinearGeneral`` sub-layers ``query``,
    ``key`` and ``value`` (kernels of shape ``(in, heads, head_dim)``), attended with
    ``attention_fn`` and projected back to ``out_features`` by ``out`` (kernel of shape
    ``(num_heads, head_dim, out_features)``). Parameters are drawn from ``rngs.params`` in the
    order query, key, value, [query_ln, key_ln], out.

    Args:
      num_heads: number of query heads.
      in_features: size of the last axis of ``inputs_q``.
      qkv_features: total size of the query/key/value projections (default
        ``in_features``); must be divisible by ``num_heads``.
      out_features: size of the output's last axis (default ``in_features``).
      num_kv_heads: number of key/value heads (default ``num_heads``); fewer heads give
        grouped-query attention and must divide ``num_heads``.
      in_kv_features: size of the last axis of ``inputs_k``/``inputs_v`` (default
        ``in_features``).
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: dtype of the parameters.
      broadcast_dropout: share one attention-dropout mask across batch and heads.
      dropout_rate: dropout rate of the attention weights.
      deterministic: True disables dropout (``model.eval()`` sets it; ``None``: must be
        given at call time when ``dropout_rate > 0``).
      precision: numerical precision of the projections and of the attention.
      kernel_init: initializer of the projection kernels.
      out_kernel_init: initializer of the ``out`` kernel (default ``kernel_init``).
      bias_init: initializer of the projection biases.
      out_bias_init: initializer of the ``out`` bias (default ``bias_init``).
      use_bias: whether the projections have biases.
      attention_fn: ``dot_product_attention`` or a function with its signature.
      decode: use the autoregressive cache (see :meth:`init_cache`); ``None``: must be given
        at call time.
      normalize_qk: apply ``LayerNorm`` (no bias) to queries and keys (Dehghani et al., 2023).
      qkv_promote_dtype: ``promote_dtype`` of the ``query``/``key``/``value`` layers.
      out_promote_dtype: ``promote_dtype`` of the ``out`` layer.
      ln_promote_dtype: ``promote_dtype`` of the ``query_ln``/``key_ln`` layers.
      qkv_dot_general: custom ``dot_general`` of the query/key/value layers.
      out_dot_general: custom ``dot_general`` of the ``out`` layer.
      qkv_dot_general_cls: class instantiated to give the query/key/value ``dot_general``.
      out_dot_general_cls: class instantiated to give the ``out`` ``dot_general``.
      rngs: random streams: parameters from ``params``; with ``dropout_rate > 0`` and
        ``keep_rngs`` a fork of the ``dropout`` stream is kept as ``self.rngs``.
      keep_rngs: whether to keep that dropout stream (otherwise pass ``rngs`` when calling).
      kernel_metadata: metadata of the query/key/value kernels.
      out_kernel_metadata: metadata of the ``out`` kernel (empty: ``kernel_metadata``).
      bias_metadata: metadata of the query/key/value biases.
      out_bias_metadata: metadata of the ``out`` bias (empty: ``bias_metadata``).
      query_ln_scale_metadata: metadata of ``query_ln.scale``.
      key_ln_scale_metadata: metadata of ``key_ln.scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn.attention import MultiHeadAttention
      >>> layer = MultiHeadAttention(2, 4, num_kv_heads=1, in_kv_features=5, decode=False,
      ...                            rngs=Rngs(0))
      >>> layer.key.kernel.shape, layer.out.kernel.shape
      ((5, 1, 2), (2, 2, 4))
      >>> layer(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 5))).shape  # cross attention
      (2, 3, 4)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = default_bias_init,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., jax.Array] = dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        out_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        ln_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        qkv_dot_general: DotGeneralFn | None = None,
        out_dot_general: DotGeneralFn | None = None,
        qkv_dot_general_cls: Callable[[], DotGeneralFn] | None = None,
        out_dot_general_cls: Callable[[], DotGeneralFn] | None = None,
        rngs: Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        out_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        out_bias_metadata: Mapping[str, Any] = _NO_METADATA,
        query_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
        key_ln_scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_attention_config(
            num_heads,
            in_features,
            qkv_features,
            out_features,
            num_kv_heads,
            in_kv_features,
            dropout_rate,
        )
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = in_features if qkv_features is None else qkv_features
        self.out_features = in_features if out_features is None else out_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = self.qkv_features // self.num_heads
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.attention_fn = attention_fn
        self.decode = decode
        self.normalize_qk = normalize_qk
        self.qkv_promote_dtype = qkv_promote_dtype
        self.out_promote_dtype = out_promote_dtype
        self.ln_promote_dtype = ln_promote_dtype
        self.qkv_dot_general = qkv_dot_general
        self.out_dot_general = out_dot_general
        self.qkv_dot_general_cls = qkv_dot_general_cls
        self.out_dot_general_cls = out_dot_general_cls

        def projection(in_features: int, heads: int) -> LinearGeneral:
            return LinearGeneral(
                in_features,
                (heads, self.head_dim),
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                use_bias=use_bias,
                precision=precision,
                promote_dtype=qkv_promote_dtype,
                dot_general=qkv_dot_general,
                dot_general_cls=qkv_dot_general_cls,
                rngs=rngs,
                kernel_metadata=kernel_metadata,
                bias_metadata=bias_metadata,
            )

        self.query = projection(self.in_features, self.num_heads)
        self.key = projection(self.in_kv_features, self.num_kv_heads)
        self.value = projection(self.in_kv_features, self.num_kv_heads)

        self.query_ln: LayerNorm | None = data(None)
        self.key_ln: LayerNorm | None = data(None)
        if normalize_qk:
            for name, metadata in (
                ("query_ln", query_ln_scale_metadata),
                ("key_ln", key_ln_scale_metadata),
            ):
                norm = LayerNorm(
                    self.head_dim,
                    use_bias=False,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    promote_dtype=ln_promote_dtype,
                    rngs=rngs,
                    scale_metadata=metadata,
                )
                setattr(self, name, norm)

        self.out = LinearGeneral(
            (self.num_heads, self.head_dim),
            self.out_features,
            axis=(-2, -1),
            kernel_init=kernel_init if out_kernel_init is None else out_kernel_init,
            bias_init=bias_init if out_bias_init is None else out_bias_init,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            promote_dtype=out_promote_dtype,
            dot_general=out_dot_general,
            dot_general_cls=out_dot_general_cls,
            rngs=rngs,
            kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata,
        )
        self.rngs: RngStream | None = (
            rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        )
        self.cached_key: Cache | None = data(None)
        self.cached_value: Cache | None = data(None)
        self.cache_index: Cache | None = data(None)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: Rngs | RngStream | jax.Array | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
    ) -> jax.Array:
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v``.

        With only ``inputs_q`` this is self-attention; ``inputs_v`` defaults to ``inputs_k``.

        Args:
          inputs_q: queries of shape ``[batch..., q_length, in_features]``.
          inputs_k: keys of shape ``[batch..., kv_length, in_kv_features]``.
          inputs_v: values of shape ``[batch..., kv_length, in_kv_features]``.
          mask: boolean mask broadcastable to ``[batch..., num_heads, q_length, kv_length]``.
          deterministic: overrides the attribute of the same name (disables dropout).
          rngs: dropout randomness for this call: an ``Rngs`` (its ``dropout`` stream), an
            ``RngStream`` or a key; default the stream kept at construction.
          sow_weights: sow the attention weights as the ``Intermediate`` ``attention_weights``.
          decode: overrides the attribute of the same name: process one token with the cache.
          is_causal: apply a causal mask (passed to ``attention_fn``).
          out_sharding: output sharding of the ``out`` projection.
          qkv_sharding: output sharding of the query/key/value projections.

        Returns:
          Array of shape ``[batch..., q_length, out_features]``.
        """
        kv_hint = ""
        if inputs_k is None:
            kv_hint = " (inputs_k defaults to inputs_q)"
            if inputs_v is not None:
                raise ValueError(
                    "MultiHeadAttention: `inputs_k` cannot be None when `inputs_v` is given. "
                    "To use the same array for keys and values, pass it as `inputs_k` and "
                    "leave `inputs_v` as None."
                )
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        for name, x, size, attr in (
            ("inputs_q", inputs_q, self.in_features, "in_features"),
            ("inputs_k", inputs_k, self.in_kv_features, "in_kv_features"),
            ("inputs_v", inputs_v, self.in_kv_features, "in_kv_features"),
        ):
            shape = jnp.shape(x)
            if len(shape) < 2 or shape[-1] != size:
                raise ValueError(
                    f"MultiHeadAttention expects {name} of shape [batch..., length, {size}] "
                    f"({attr}={size}), got shape {shape}{'' if name == 'inputs_q' else kv_hint}."
                )

        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            assert self.query_ln is not None and self.key_ln is not None
            query = self.query_ln(query)
            key = self.key_ln(key)

        decode = _first_from("decode", "", decode, self.decode)
        if decode:
            key, value, mask = self._update_cache(key, value, mask)

        dropout_rng = None
        if self.dropout_rate > 0.0:
            deterministic = _first_from(
                "deterministic",
                ", or set it with model.train() / model.eval()",
                deterministic,
                self.deterministic,
            )
            if not deterministic:
                dropout_rng = self._dropout_key(rngs)
        else:
            deterministic = True

        kwargs: dict[str, Any] = {"is_causal": True} if is_causal else {}
        x = self.attention_fn(
            query,
            key,
            value,
            mask=mask,
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout,
            deterministic=deterministic,
            dtype=self.dtype,
            precision=self.precision,
            module=self if sow_weights else None,
            **kwargs,
        )
        return self.out(x, out_sharding=out_sharding)

    def _dropout_key(self, rngs: Rngs | RngStream | jax.Array | None) -> jax.Array:
        if rngs is None:
            rngs = self.rngs
        if rngs is None:
            raise ValueError(
                "MultiHeadAttention needs random keys for attention dropout: pass "
                "`rngs=nnx.Rngs(dropout=...)` when calling it (the layer keeps none because "
                "it was built with keep_rngs=False), or set deterministic=True (model.eval())."
            )
        if isinstance(rngs, Rngs):
            return rngs.dropout()
        if isinstance(rngs, RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(
            "MultiHeadAttention: rngs must be an Rngs, an RngStream or a jax key, got "
            f"{type(rngs).__name__}."
        )

    def _update_cache(
        self, key: jax.Array, value: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        cached_key, cached_value, cache_index = self.cached_key, self.cached_value, self.cache_index
        if cached_key is None or cached_value is None or cache_index is None:
            raise ValueError(
                "MultiHeadAttention: autoregressive cache not initialized (decode=True). Call "
                "`layer.init_cache((batch, max_length, in_features))` first, or pass "
                "decode=False."
            )
        *batch_dims, max_length, num_kv_heads, head_dim = cached_key.shape
        expected = (*batch_dims, 1, num_kv_heads, head_dim)
        if tuple(key.shape) != expected:
            raise ValueError(
                f"MultiHeadAttention: decode=True processes one token per call; expected keys "
                f"of shape {expected} (from the cache of shape {cached_key.shape}), got "
                f"{key.shape}. Pass inputs of shape {(*batch_dims, 1, self.in_kv_features)}."
            )
        index = cache_index[...]
        if not isinstance(index, jax.core.Tracer) and int(index) >= max_length:
            raise ValueError(
                f"MultiHeadAttention: the decode cache is full ({max_length} positions); call "
                "init_cache again with a larger max_length."
            )
        zero = jnp.zeros((), dtype=index.dtype)
        start = (zero,) * len(batch_dims) + (index, zero, zero)
        key = lax.dynamic_update_slice(cached_key[...], key.astype(cached_key.dtype), start)
        value = lax.dynamic_update_slice(cached_value[...], value.astype(cached_value.dtype), start)
        cached_key[...] = key
        cached_value[...] = value
        cache_index[...] = index + 1
        # The single query may only see positions already written to the cache.
        seen = jnp.broadcast_to(jnp.arange(max_length) <= index, (*batch_dims, 1, 1, max_length))
        return key, value, combine_masks(mask, seen)

    def init_cache(self, input_shape: Shape, dtype: Dtype = jnp.float32) -> None:
        """Allocates the autoregressive cache for ``decode=True`` calls.

        Creates the ``Cache`` Variables ``cached_key`` and ``cached_value`` of shape
        ``(*batch, max_length, num_kv_heads, head_dim)`` (zeros) and ``cache_index`` (0).

        Args:
          input_shape: shape of the full input sequence, ``(*batch, max_length, features)``.
          dtype: dtype of the cached keys and values.

        Example:
          >>> import jax.numpy as jnp
          >>> from refax._rngs import Rngs
          >>> from refax.nn.attention import MultiHeadAttention
          >>> layer = MultiHeadAttention(2, 4, decode=True, rngs=Rngs(0))
          >>> layer.init_cache((2, 3, 4))  # (batch, max_length, features)
          >>> layer(jnp.ones((2, 1, 4))).shape  # one token per call
          (2, 1, 4)
          >>> layer.cached_key.shape, int(layer.cache_index[...])
          ((2, 3, 2, 2), 1)
        """
        shape = (*tuple(input_shape)[:-1], self.num_kv_heads, self.head_dim)
        self.cached_key = Cache(jnp.zeros(shape, dtype))
        self.cached_value = Cache(jnp.zeros(shape, dtype))
        self.cache_index = Cache(jnp.array(0, dtype=jnp.int32))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | Shape | None = None,
        max_length: int | None = None,
    ) -> None:
        """Hook used by ``nnx.view``: sets ``deterministic``/``decode``.

        When switching to ``decode=True`` without a cache and both ``batch_size`` and
        ``max_length`` are given, a cache is allocated (dtype ``self.dtype``, default float32);
        otherwise call :meth:`init_cache` before decoding.

        Args:
          deterministic: True disables attention dropout (evaluation), False enables it.
          decode: True switches to autoregressive decoding with the key/value cache.
          batch_size: batch shape of the cache allocated when switching to ``decode=True``.
          max_length: sequence length of the cache allocated when switching to
            ``decode=True``.
        """
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is None:
            return
        self.decode = decode
        if decode and self.cached_key is None and batch_size is not None and max_length is not None:
            batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
            dtype = jnp.float32 if self.dtype is None else self.dtype
            self.init_cache((*batch, max_length, self.in_kv_features), dtype)
