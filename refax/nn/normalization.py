"""Normalization layers: ``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm`` (the weight-normalizing wrappers live in ``refax.nn.weight_norms``).

The activation normalizers compute a mean and a variance of the inputs over some *reduction*
axes, then return ``(x - mean) / sqrt(var + epsilon) * scale + bias`` with learnable
``scale``/``bias`` Params over the *feature* axes. Statistics are always computed in at least
``float32`` (half-precision inputs are promoted), optionally across devices with ``axis_name``
(a ``lax.pmean`` under ``vmap``/``shard_map``/``pmap``), and can ignore masked-out entries.

``BatchNorm`` keeps running averages of the batch statistics in ``BatchStat`` Variables
``mean`` and ``var``; in training mode (``use_running_average=False``, set by
``model.train()``) it normalizes with the batch statistics and updates the running averages,
in evaluation mode (``model.eval()``) it normalizes with the running averages.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn import BatchNorm
  >>> bn = BatchNorm(3, momentum=0.9, rngs=Rngs(0))
  >>> y = bn(jnp.arange(6.0).reshape(2, 3))
  >>> bn.mean[...]
  Array([0.15, 0.25, 0.35], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from refax._filters import PathContains
from refax._module import Module
from refax._variables import BatchStat, Param
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.typing import Axes, Dtype, Initializer

if TYPE_CHECKING:
    from refax._rngs import Rngs

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm",
]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
default_bias_init = initializers.zeros_init()
default_scale_init = initializers.ones_init()
_KERNELS = PathContains("kernel")  # WeightNorm's default variable_filter


def _canonicalize_axes(rank: int, axes: Axes) -> tuple[int, ...]:
    axes = tuple(axes) if isinstance(axes, Iterable) else (axes,)
    return tuple(sorted({ax % rank if rank else ax for ax in axes}))


def _abs_sq(x: jax.Array) -> jax.Array:
    if jnp.iscomplexobj(x):
        return lax.real(x * lax.conj(x))
    return lax.square(x)


def _compute_stats(
    x: jax.Array,
    axes: Axes,
    dtype: Dtype | None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_mean: bool = True,
    use_fast_variance: bool = True,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of ``x`` over ``axes``, in at least float32, optionally pmean-ed."""
    if dtype is None:
        dtype = jnp.result_type(x)
    dtype = jnp.promote_types(dtype, jnp.float32)
    x = jnp.asarray(x, dtype)
    axes = _canonicalize_axes(x.ndim, axes)

    def mean(*xs: jax.Array) -> tuple[jax.Array, ...]:
        mus = tuple(v.mean(axes, where=mask) for v in xs)
        if axis_name is None:
            return mus
        if len(mus) == 1:
            return (lax.pmean(mus[0], axis_name, axis_index_groups=axis_index_groups),)
        stacked = lax.pmean(jnp.stack(mus), axis_name, axis_index_groups=axis_index_groups)
        return tuple(stacked[i] for i in range(len(mus)))

    if use_mean:
        if use_fast_variance:
            mu, mu2 = mean(x, _abs_sq(x))
            # E[x^2] - E[x]^2 can come out slightly negative from round-off.
            var = jnp.maximum(0.0, mu2 - _abs_sq(mu))
        else:
            (mu,) = mean(x)
            (var,) = mean(_abs_sq(x - jnp.expand_dims(mu, axes)))
    else:
        (var,) = mean(_abs_sq(x))
        mu = jnp.zeros_like(var)
    return mu, var


def _normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    reduction_axes: Axes,
    feature_axes: Axes,
    dtype: Dtype | None,
    epsilon: float,
) -> jax.Array:
    """``(x - mean) * rsqrt(var + epsilon) * scale + bias``, cast to the result dtype.

    ``mean``/``var`` have the shape of ``x`` without the reduction axes; ``scale``/``bias``
    the size of the feature axes. The result dtype is ``dtype`` or, when ``None``, the promoted
    dtype of ``x``, ``scale`` and ``bias``.
    """
    reduction_axes = _canonicalize_axes(x.ndim, reduction_axes)
    feature_axes = _canonicalize_axes(x.ndim, feature_axes)
    stats_shape = list(x.shape)
    for ax in reduction_axes:
        stats_shape[ax] = 1
    feature_shape = [1] * x.ndim
    for ax in feature_axes:
        feature_shape[ax] = x.shape[ax]
    y = x - mean.reshape(stats_shape)
    mul = lax.rsqrt(var.reshape(stats_shape) + epsilon)
    if scale is not None:
        mul *= scale.reshape(feature_shape)
    y *= mul
    if bias is not None:
        y += bias.reshape(feature_shape)
    return jnp.asarray(y, dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype))


def _value(param: Any) -> Any:
    return None if param is None else param[...]


def _check_features(layer: str, x: jax.Array, feature_axes: Axes, num_features: int) -> None:
    if x.ndim == 0:
        raise ValueError(f"{layer} expects inputs of rank >= 1, got a scalar.")
    axes = _canonicalize_axes(x.ndim, feature_axes)
    size = int(np.prod([x.shape[ax] for ax in axes]))
    if size != num_features:
        raise ValueError(
            f"{layer} expects num_features={num_features} along feature axes "
            f"{tuple(feature_axes) if isinstance(feature_axes, Iterable) else feature_axes}, "
            f"got inputs of shape {x.shape}."
        )


def _first_from(layer: str, name: str, *values: bool | None) -> bool:
    for v in values:
        if v is not None:
            return v
    raise ValueError(
        f"No `{name}` argument was provided to {layer}: pass `{name}=True/False` to the "
        f"constructor or to __call__, or set it on the whole model with model.train() / "
        "model.eval()."
    )


def _check_common(layer: str, num_features: Any, epsilon: Any) -> None:
    _checks.positive_int(
        layer,
        "num_features",
        num_features,
        "Pass the number of features (the size of the feature axis or axes).",
    )
    _checks.nonnegative_float(
        layer,
        "epsilon",
        epsilon,
        "Pass a small constant such as 1e-6 (it is added to the variance).",
    )


def _scale_bias(
    module: Module,
    num_features: int,
    rngs: Rngs,
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    param_dtype: Dtype,
    scale_metadata: Mapping[str, Any],
    bias_metadata: Mapping[str, Any],
) -> None:
    """Creates ``scale`` then ``bias`` (one ``rngs.params`` key each, only when used)."""
    shape = (num_features,)
    module.scale = None
    if use_scale:
        module.scale = Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
    module.bias = None
    if use_bias:
        module.bias = Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)


class BatchNorm(Module):
    """Batch normalization with running statistics (Ioffe & Szegedy, 2015).

    Args:
      num_features: size of the feature axis.
      use_running_average: True normalizes with the running ``mean``/``var`` (evaluation),
        False with the statistics of the batch and updates the running averages (training);
        ``None`` requires it at call time.
      axis: the feature axis; every other axis is reduced over.
      momentum: decay of the running averages: ``new = momentum * old + (1 - momentum) * batch``.
      epsilon: small constant added to the variance.
      dtype: dtype of the result (``None``: inferred from inputs and parameters).
      param_dtype: dtype of ``scale`` and ``bias`` (the running stats are always float32).
      use_bias: whether to add a learnable ``bias``.
      use_scale: whether to multiply by a learnable ``scale``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: name of a mapped axis (vmap/pmap/shard_map) to average statistics over.
      axis_index_groups: groups of devices along ``axis_name`` to average within.
      use_fast_variance: compute the variance as ``E[x^2] - E[x]^2`` (faster, less stable).
      promote_dtype: function casting ``(x, mean, var, scale, bias)`` (the running
        statistics) to the computation dtype.
      rngs: random streams; keys for ``scale`` and ``bias`` come from ``rngs.params``.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import BatchNorm
      >>> bn = BatchNorm(2, rngs=Rngs(0))
      >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0]])
      >>> bn(x).round(3)  # training mode: batch statistics
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> bn.mean[...], bn.var[...]  # running averages moved 1% towards (1, 2) and (1, 1)
      (Array([0.01, 0.02], dtype=float32), Array([1., 1.], dtype=float32))
      >>> bn.use_running_average = True  # what model.eval() does
      >>> y = bn(x)
      >>> bool(jnp.allclose(y, (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5)))
      True
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = default_bias_init,
        scale_init: Initializer = default_scale_init,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_common("BatchNorm", num_features, epsilon)
        _checks.fraction(
            "BatchNorm",
            "momentum",
            momentum,
            "It is the decay of the running averages (e.g. 0.99; 1 freezes them).",
            include_one=True,
        )
        feature_shape = (num_features,)
        self.mean = BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = BatchStat(jnp.ones(feature_shape, jnp.float32))
        _scale_bias(
            self,
            num_features,
            rngs,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            scale_metadata,
            bias_metadata,
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode also updates ``mean``/``var`` in place.

        Args:
          x: inputs with ``num_features`` entries along ``axis``.
          use_running_average: overrides the attribute of the same name for this call.
          mask: boolean array broadcastable to ``x``; False entries are left out of the
            batch statistics.

        Returns:
          The normalized array, of the shape of ``x``.
        """
        use_running_average = _first_from(
            "BatchNorm", "use_running_average", use_running_average, self.use_running_average
        )
        x = jnp.asarray(x)
        _check_features("BatchNorm", x, self.axis, self.mean.shape[0])
        feature_axes = _canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        x, ra_mean, ra_var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)),
            dtype=self.dtype,
        )
        if use_running_average:
            mean, var = ra_mean, ra_var
        else:
            mean, var = _compute_stats(
                x,
                reduction_axes,
                dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance,
                mask=mask,
            )
            m = self.momentum
            # statistics kept in JAX references cannot take values that carry gradients
            refs = self.mean.ref or self.mean.hijax or self.var.ref or self.var.hijax
            sg = jax.lax.stop_gradient if refs else (lambda a: a)
            self.mean[...] = sg(m * self.mean[...] + (1 - m) * mean)
            self.var[...] = sg(m * self.var[...] + (1 - m) * var)
        return _normalize(
            x,
            mean,
            var,
            scale,
            bias,
            reduction_axes,
            feature_axes,
            self.dtype,
            self.epsilon,
        )

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook used by ``nnx.view``: sets ``use_running_average`` when given.

        Args:
          use_running_average: True: normalize with the stored running statistics
            (evaluation); False: with the statistics of the batch, updating the running ones
            (training).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(Module):
    """Layer normalization (Ba et al., 2016): normalizes each example over its features.

    Args:
      num_features: number of features (the product of the sizes of ``feature_axes``).
      epsilon: small constant added to the variance.
      dtype: dtype of the result (``None``: inferred from inputs and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: whether to add a learnable ``bias``.
      use_scale: whether to multiply by a learnable ``scale``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      reduction_axes: axes the statistics are computed over.
      feature_axes: axes ``scale`` and ``bias`` span.
      axis_name: name of a mapped axis to average statistics over.
      axis_index_groups: groups of devices along ``axis_name`` to average within.
      use_fast_variance: compute the variance as ``E[x^2] - E[x]^2``.
      promote_dtype: function casting ``(x, scale, bias)`` to the computation dtype.
      rngs: random streams; keys for ``scale`` and ``bias`` come from ``rngs.params``.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import LayerNorm
      >>> ln = LayerNorm(3, rngs=Rngs(0))
      >>> ln(jnp.array([[1.0, 2.0, 3.0]])).round(4)
      Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = default_bias_init,
        scale_init: Initializer = default_scale_init,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_common("LayerNorm", num_features, epsilon)
        _scale_bias(
            self,
            num_features,
            rngs,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            scale_metadata,
            bias_metadata,
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x`` over ``reduction_axes`` (``mask``: entries to include)."""
        x = jnp.asarray(x)
        _check_features("LayerNorm", x, self.feature_axes, self.num_features)
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        mean, var = _compute_stats(
            x,
            self.reduction_axes,
            self.dtype,
            self.axis_name,
            self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return _normalize(
            x,
            mean,
            var,
            scale,
            bias,
            self.reduction_axes,
            self.feature_axes,
            self.dtype,
            self.epsilon,
        )


class RMSNorm(Module):
    """Root-mean-square normalization (Zhang & Sennrich, 2019): ``x / rms(x) * scale``.

    Like :class:`LayerNorm` without re-centering and without a bias.

    Args:
      num_features: number of features (the product of the sizes of ``feature_axes``).
      epsilon: small constant added to the mean square.
      dtype: dtype of the result (``None``: inferred from inputs and parameters).
      param_dtype: dtype of ``scale``.
      use_scale: whether to multiply by a learnable ``scale``.
      scale_init: initializer of ``scale``.
      reduction_axes: axes the statistics are computed over.
      feature_axes: axes ``scale`` spans.
      axis_name: name of a mapped axis to average statistics over.
      axis_index_groups: groups of devices along ``axis_name`` to average within.
      use_fast_variance: unused by RMSNorm (kept for API compatibility).
      promote_dtype: function casting ``(x, scale)`` to the computation dtype.
      rngs: random streams; the key for ``scale`` comes from ``rngs.params``.
      scale_metadata: metadata of the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import RMSNorm
      >>> RMSNorm(2, rngs=Rngs(0))(jnp.array([2.0, -2.0])).round(4)  # divided by rms = 2
      Array([ 1., -1.], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = default_scale_init,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_common("RMSNorm", num_features, epsilon)
        self.scale: Param | None = None
        if use_scale:
            self.scale = Param(
                scale_init(rngs.params(), (num_features,), param_dtype), **scale_metadata
            )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x`` by its root mean square over ``reduction_axes``."""
        x = jnp.asarray(x)
        _check_features("RMSNorm", x, self.feature_axes, self.num_features)
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        mean, var = _compute_stats(
            x,
            self.reduction_axes,
            self.dtype,
            self.axis_name,
            self.axis_index_groups,
            use_mean=False,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return _normalize(
            x,
            mean,
            var,
            scale,
            None,
            self.reduction_axes,
            self.feature_axes,
            self.dtype,
            self.epsilon,
        )


class GroupNorm(Module):
    """Group normalization (Wu & He, 2018): features split into groups, each normalized.

    Statistics are computed per example over the non-batch, non-feature axes and the features
    of one group. Give exactly one of ``num_groups`` and ``group_size`` (pass
    ``num_groups=None`` to use ``group_size``).

    Args:
      num_features: size of the last (feature) axis.
      num_groups: number of groups; must divide ``num_features``.
      group_size: features per group; must divide ``num_features``.
      epsilon: small constant added to the variance.
      dtype: dtype of the result (``None``: inferred from inputs and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: whether to add a learnable ``bias``.
      use_scale: whether to multiply by a learnable ``scale``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      reduction_axes: axes to reduce over (``None``: all but the first, the leading batch
        axis); the last axis must be included.
      axis_name: name of a mapped axis to average statistics over.
      axis_index_groups: groups of devices along ``axis_name`` to average within.
      use_fast_variance: compute the variance as ``E[x^2] - E[x]^2``.
      promote_dtype: function casting ``(x, scale, bias)`` to the computation dtype.
      rngs: random streams; keys for ``scale`` and ``bias`` come from ``rngs.params``.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import GroupNorm
      >>> gn = GroupNorm(4, num_groups=2, rngs=Rngs(0))
      >>> gn(jnp.array([[0.0, 2.0, 10.0, 30.0]])).round(4)
      Array([[-1.,  1., -1.,  1.]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = default_bias_init,
        scale_init: Initializer = default_scale_init,
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_common("GroupNorm", num_features, epsilon)
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                "GroupNorm: either `num_groups` or `group_size` should be specified. If "
                "`group_size` is to be specified, pass `num_groups=None` as argument to "
                "override the default `num_groups` value of 32."
            )
        if group_size is not None:
            fix = "Pass the number of features per group; it must divide num_features."
            _checks.positive_int("GroupNorm", "group_size", group_size, fix)
            if num_features % group_size != 0:
                raise ValueError(
                    f"GroupNorm: group_size must divide num_features: the number of features "
                    f"({num_features}) is not multiple of the group size ({group_size}). {fix}"
                )
            num_groups = num_features // group_size
        assert num_groups is not None
        fix = "Pass a number of groups that divides num_features (or give group_size instead)."
        _checks.positive_int("GroupNorm", "num_groups", num_groups, fix)
        if num_features % num_groups != 0:
            raise ValueError(
                f"GroupNorm: num_groups must divide num_features: the number of groups "
                f"({num_groups}) does not divide the number of channels ({num_features}). {fix}"
            )
        self.feature_axis = -1
        self.num_features = num_features
        self.num_groups = num_groups
        self.group_size = num_features // num_groups
        _scale_bias(
            self,
            num_features,
            rngs,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            scale_metadata,
            bias_metadata,
        )
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x`` (shape ``(batch, ..., num_features)``) group by group."""
        x = jnp.asarray(x)
        _check_features("GroupNorm", x, self.feature_axis, self.num_features)
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        if self.reduction_axes is not None:
            reduction_axes: Sequence[int] | int = self.reduction_axes
        else:
            reduction_axes = [*range(1, x.ndim - 1), -1]
        reduction_axes = _canonicalize_axes(x.ndim, reduction_axes)
        if reduction_axes[-1] != x.ndim - 1:
            raise ValueError(
                f"GroupNorm: reduction_axes {self.reduction_axes} must include the last "
                f"(feature) axis of inputs of shape {x.shape}."
            )
        group_shape = x.shape[:-1] + (self.num_groups, self.group_size)
        if mask is not None:
            mask = mask.reshape(mask.shape[:-1] + (self.num_groups, self.group_size))
        mean, var = _compute_stats(
            x.reshape(group_shape),
            [*reduction_axes[:-1], -1],
            self.dtype,
            self.axis_name,
            self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        mean = jnp.repeat(mean, self.group_size, axis=-1)
        var = jnp.repeat(var, self.group_size, axis=-1)
        return _normalize(
            x,
            mean,
            var,
            scale,
            bias,
            reduction_axes[:-1],
            (self.feature_axis,),
            self.dtype,
            self.epsilon,
        )


class InstanceNorm(Module):
    """Instance normalization (Ulyanov et al., 2016): each example, each channel on its own.

    Statistics are computed per example (axis 0 is the batch axis) and per feature over every
    other axis, e.g. over height and width of ``(batch, height, width, channels)`` images.
    Equivalent to ``LayerNorm`` with ``reduction_axes`` = the non-batch, non-feature axes, and
    to ``GroupNorm`` with one group per channel.

    Args:
      num_features: number of features (the product of the sizes of ``feature_axes``).
      epsilon: small constant added to the variance.
      dtype: dtype of the result (``None``: inferred from inputs and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: whether to add a learnable ``bias``.
      use_scale: whether to multiply by a learnable ``scale``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      feature_axes: axes ``scale`` and ``bias`` span; must not include the batch axis 0.
      axis_name: name of a mapped axis to average statistics over.
      axis_index_groups: groups of devices along ``axis_name`` to average within.
      use_fast_variance: compute the variance as ``E[x^2] - E[x]^2``.
      promote_dtype: function casting ``(x, scale, bias)`` to the computation dtype.
      rngs: random streams; keys for ``scale`` and ``bias`` come from ``rngs.params``.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import InstanceNorm
      >>> norm = InstanceNorm(2, rngs=Rngs(0))
      >>> x = jnp.array([[[0.0, 5.0], [2.0, 7.0]]])  # (batch=1, length=2, channels=2)
      >>> norm(x).round(3)  # each channel normalized over the length axis
      Array([[[-1., -1.],
              [ 1.,  1.]]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = default_bias_init,
        scale_init: Initializer = default_scale_init,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _check_common("InstanceNorm", num_features, epsilon)
        _scale_bias(
            self,
            num_features,
            rngs,
            use_scale,
            use_bias,
            scale_init,
            bias_init,
            param_dtype,
            scale_metadata,
            bias_metadata,
        )
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x`` per example and feature (``mask``: entries to include)."""
        x = jnp.asarray(x)
        _check_features("InstanceNorm", x, self.feature_axes, self.num_features)
        feature_axes = _canonicalize_axes(x.ndim, self.feature_axes)
        if 0 in feature_axes:
            raise ValueError(
                f"InstanceNorm: feature_axes {self.feature_axes} include axis 0 of inputs of "
                f"shape {x.shape}, but axis 0 is the batch axis; use feature axes >= 1."
            )
        reduction_axes = tuple(i for i in range(1, x.ndim) if i not in feature_axes)
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        mean, var = _compute_stats(
            x,
            reduction_axes,
            self.dtype,
            self.axis_name,
            self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        return _normalize(
            x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon
        )
