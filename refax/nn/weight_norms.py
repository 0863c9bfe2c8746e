"""Weight reparameterisation wrappers: ``WeightNorm`` and ``SpectralNorm``.

Both wrap another layer and rewrite its weights (in place, before every call).
``WeightNorm`` divides each selected weight by its L2 norm over the non-feature axes and
multiplies it by a learnable per-feature ``scales`` array; ``SpectralNorm`` divides every
matrix weight by an estimate of its largest singular value, refined by power iteration whose
state (``u`` and ``sigma`` per weight) lives in ``BatchStat`` Variables.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn import Linear, WeightNorm
  >>> layer = WeightNorm(Linear(3, 4, rngs=Rngs(0)), rngs=Rngs(1))
  >>> layer(jnp.ones((2, 3))).shape
  (2, 4)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from refax._filters import to_predicate
from refax._graph import state as graph_state
from refax._module import Module
from refax._statelib import to_flat_state
from refax._variables import BatchStat, Param, Variable
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.nn.normalization import (
    _KERNELS,
    _canonicalize_axes,
    default_scale_init,
)
from refax.typing import Axes, Dtype, Filter, Initializer

if TYPE_CHECKING:
    from refax._rngs import Rngs

__all__ = ["WeightNorm", "SpectralNorm"]


def _l2_normalize(x: jax.Array, axis: Axes | None = None, eps: float = 1e-12) -> jax.Array:
    """``x / sqrt(sum(x**2, axis) + eps)`` (``axis=None``: the whole array)."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def _no_consume_key(rngs: Rngs, index: int) -> jax.Array:
    """A key for ``WeightNorm`` scales that leaves the ``params`` stream's count untouched,
    so layers created after the wrapper from the same ``Rngs`` get the keys they would get
    without it."""
    stream = rngs.params
    base = jax.random.fold_in(stream.key[...], stream.count[...])
    return jax.random.fold_in(jax.random.fold_in(base, 0x5CA1E), index)


class WeightNorm(Module):
    """L2 weight normalization (Salimans & Kingma, 2016) of a wrapped layer's weights.

    Before every call, each weight selected by ``variable_filter`` is replaced, in place, by
    ``w / ||w|| * scale``: the norm is taken over the axes not in ``feature_axes`` and
    ``scale`` is a learnable array over the feature axes, kept in the ``scales`` dict keyed by
    the weight's path inside ``layer_instance``. The wrapped layer then runs with the
    normalized weights, and gradients flow through the normalization to the stored weights.

    Args:
      layer_instance: the layer to wrap.
      feature_axes: axes of each weight that keep their own norm (and own ``scale``);
        ``None`` normalizes each weight as a whole.
      use_scale: whether to multiply the normalized weights by learnable scales.
      scale_init: initializer of the scales (default ones).
      epsilon: small constant added to the squared norm.
      dtype: dtype of the normalized weights (``None``: inferred from weight and scale).
      param_dtype: dtype of the scales.
      variable_filter: filter selecting the weights to normalize (default: paths containing
        ``'kernel'``).
      promote_dtype: dtype promotion function (stored for API compatibility).
      rngs: random streams; scale keys are derived from ``rngs.params`` without advancing it.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Linear, WeightNorm
      >>> layer = WeightNorm(Linear(3, 2, rngs=Rngs(0)), rngs=Rngs(1))
      >>> layer.scales[("kernel",)]
      Array([1., 1.], dtype=float32)
      >>> y = layer(jnp.ones((1, 3)))
      >>> jnp.linalg.norm(layer.layer_instance.kernel[...], axis=0).round(4)  # unit columns
      Array([1., 1.], dtype=float32)
    """

    def __init__(
        self,
        layer_instance: Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = default_scale_init,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: Filter = _KERNELS,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
    ):
        _checks.nonnegative_float(
            "WeightNorm", "epsilon", epsilon, "Pass a small constant such as 1e-12."
        )
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.scale_init = scale_init
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        self.scales: dict[tuple, jax.Array] | None = None
        if use_scale:
            scales = {}
            params = to_flat_state(graph_state(layer_instance, Param))
            for path, param in params:
                if not self.variable_filter(path, param):
                    continue
                axes = _canonicalize_axes(param.ndim, self.feature_axes)
                shape = tuple(param.shape[ax] for ax in axes)
                scales[path] = scale_init(_no_consume_key(rngs, len(scales)), shape, param_dtype)
            self.scales = scales

    def _normalize_weight(self, path: tuple, param: Variable) -> None:
        w = param[...]
        feature_axes = _canonicalize_axes(w.ndim, self.feature_axes)
        reduction_axes = tuple(i for i in range(w.ndim) if i not in feature_axes)
        w_bar = _l2_normalize(w, axis=reduction_axes, eps=self.epsilon)
        scale = None
        if self.use_scale:
            assert self.scales is not None
            if path not in self.scales:
                raise RuntimeError(
                    f"WeightNorm: no scale for weight {path!r} of the wrapped layer: its "
                    "parameters changed after the wrapper was built. Build a new WeightNorm "
                    "around the changed layer."
                )
            shape = [1] * w.ndim
            for ax in feature_axes:
                shape[ax] = w.shape[ax]
            scale = jnp.reshape(self.scales[path], shape)
            w_bar = w_bar * scale
        dtype = dtypes.canonicalize_dtype(w, scale, dtype=self.dtype)
        param.set_value(jnp.asarray(w_bar, dtype))

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """Normalizes the selected weights in place, then calls the wrapped layer.

        Args:
          x: the first input of the wrapped layer.
          *args: further positional arguments of the wrapped layer.
          **kwargs: keyword arguments of the wrapped layer.

        Returns:
          The wrapped layer's output computed with the normalized weights.
        """
        for path, variable in to_flat_state(graph_state(self.layer_instance)):
            if isinstance(variable, Variable) and self.variable_filter(path, variable):
                self._normalize_weight(path, variable)
        return self.layer_instance(x, *args, **kwargs)


class SpectralNorm(Module):
    """Spectral normalization (Miyato et al., 2018) of a wrapped layer's weight matrices.

    Before every call, each ``Param`` of ``layer_instance`` with 2 or more dimensions is
    replaced, in place, by ``w / sigma`` where ``sigma`` estimates its largest singular value
    (weights of higher rank are seen as matrices ``(-1, w.shape[-1])``; scalars and vectors
    are left unchanged). ``sigma`` comes from ``n_steps`` of power iteration started from the
    stored left vector ``u``; with ``update_stats`` the refined ``u`` and ``sigma`` are stored
    back, so the estimate improves from call to call. Both live in ``BatchStat`` Variables in
    the ``batch_stats`` dict, keyed by the weight's path plus ``'u'`` or ``'sigma'``.

    ``model.train()`` / ``model.eval()`` switch ``use_running_average`` (the negation of
    ``update_stats``), like they do for ``BatchNorm``.

    Args:
      layer_instance: the layer to wrap.
      n_steps: power-iteration steps per call (0: no normalization).
      epsilon: small constant of the L2 normalizations inside the power iteration.
      dtype: dtype of the normalized weights (``None``: inferred).
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise on weights of rank > 2 instead of flattening them.
      update_stats: whether calls store the refined ``u`` and ``sigma`` (training).
      rngs: random streams; one ``rngs.params`` key per matrix weight initializes ``u``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Linear, SpectralNorm
      >>> layer = SpectralNorm(Linear(4, 3, rngs=Rngs(0)), n_steps=20, rngs=Rngs(1))
      >>> sorted(layer.batch_stats)
      [('kernel', 'sigma'), ('kernel', 'u')]
      >>> y = layer(jnp.ones((2, 4)))
      >>> float(jnp.linalg.norm(layer.layer_instance.kernel[...], ord=2).round(3))
      1.0
    """

    def __init__(
        self,
        layer_instance: Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: Rngs,
    ):
        _checks.nonnegative_int(
            "SpectralNorm",
            "n_steps",
            n_steps,
            "Pass the number of power-iteration steps per call (0 disables normalization).",
        )
        _checks.nonnegative_float(
            "SpectralNorm", "epsilon", epsilon, "Pass a small constant such as 1e-12."
        )
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        # train()/eval() set use_running_average; update_stats is its negation.
        self.use_running_average = not update_stats
        batch_stats: dict[tuple, BatchStat] = {}
        for path, param in to_flat_state(graph_state(layer_instance, Param)):
            matrix = self._as_matrix(param[...])
            if matrix is None:
                continue
            key = rngs.params()
            u0 = initializers.normal()(key, (1, matrix.shape[-1]), param_dtype)
            batch_stats[(*path, "u")] = BatchStat(u0)
            batch_stats[(*path, "sigma")] = BatchStat(jnp.ones((), param_dtype))
        self.batch_stats = batch_stats

    def _as_matrix(self, w: jax.Array) -> jax.Array | None:
        """``w`` as a matrix, or None when it is not normalized (rank < 2, or no steps)."""
        if w.ndim <= 1 or self.n_steps < 1:
            return None
        if w.ndim > 2:
            if self.error_on_non_matrix:
                raise ValueError(
                    f"SpectralNorm: a weight of the wrapped layer has rank {w.ndim} (shape "
                    f"{w.shape}) but error_on_non_matrix=True; pass error_on_non_matrix=False "
                    "to normalize it as a (-1, last axis) matrix."
                )
            w = jnp.reshape(w, (-1, w.shape[-1]))
        return w

    def _normalize_weight(self, path: tuple, param: Variable, update_stats: bool) -> None:
        w = param[...]
        matrix = self._as_matrix(w)
        if matrix is None:
            return
        u_var = self.batch_stats.get((*path, "u"))
        sigma_var = self.batch_stats.get((*path, "sigma"))
        if u_var is None or sigma_var is None:
            raise RuntimeError(
                f"SpectralNorm: no power-iteration state for weight {path!r} of the wrapped "
                "layer: its parameters changed after the wrapper was built. Build a new "
                "SpectralNorm around the changed layer."
            )
        u = u_var[...]
        for _ in range(self.n_steps):
            v = _l2_normalize(u @ matrix.T, eps=self.epsilon)
            u = _l2_normalize(v @ matrix, eps=self.epsilon)
        u, v = lax.stop_gradient(u), lax.stop_gradient(v)
        sigma = (v @ matrix @ u.T)[0, 0]
        normalized = (matrix / jnp.where(sigma != 0, sigma, 1)).reshape(w.shape)
        if update_stats:  # stored in the dtype they were created with (param_dtype)
            u_var[...] = jnp.asarray(u, u_var.dtype)
            sigma_var[...] = jnp.asarray(sigma, sigma_var.dtype)
        dtype = dtypes.canonicalize_dtype(normalized, u, v, sigma, dtype=self.dtype)
        param[...] = jnp.asarray(normalized, dtype)

    def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
        """Normalizes the wrapped layer's matrices in place, then calls it on ``x``.

        Args:
          x: the input of the wrapped layer.
          update_stats: store the refined ``u``/``sigma`` (default: ``not
            self.use_running_average``).

        Returns:
          The wrapped layer's output computed with the normalized weights.
        """
        if update_stats is None:
            update_stats = not self.use_running_average
        for path, param in to_flat_state(graph_state(self.layer_instance, Param)):
            self._normalize_weight(path, param, update_stats)
        return self.layer_instance(x)
