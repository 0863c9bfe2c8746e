"""Convolution layers: :class:`Conv` and :class:`ConvTranspose`.

Both layers use the channels-last layout: inputs have shape
``(*batch_dims, *spatial_dims, in_features)`` and outputs ``(*batch_dims, *spatial_out,
out_features)``. The number of spatial dimensions is ``len(kernel_size)``; any number of leading
batch dimensions is accepted (they are flattened into one for the convolution and restored
afterwards), including none at all for single-example code.

:class:`Conv` wraps ``jax.lax.conv_general_dilated``; its kernel has shape
``kernel_size + (in_features // feature_group_count, out_features)``. Besides the padding
strings XLA understands (``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``) it implements
``'CIRCULAR'`` (periodic boundaries), ``'REFLECT'`` (mirror boundaries) and, for 1-D kernels,
``'CAUSAL'`` (left padding only, so output ``t`` sees inputs ``<= t``). Explicit padding is an
int (same on both sides of every spatial dim) or one int or ``(low, high)`` pair per spatial
dim; see :func:`canonicalize_padding`.

:class:`ConvTranspose` wraps ``jax.lax.conv_transpose`` (kernel
``kernel_size + (in_features, out_features)``, or ``(out_features, in_features)`` with
``transpose_kernel=True``). Note that, unlike PyTorch, its explicit padding is applied to the
stride-dilated input as given; ``'CIRCULAR'`` wraps the output periodically with period
``input_size * stride``.

Parameters are drawn from ``rngs.params`` in the order kernel then bias, stored in
``param_dtype``, and the computation runs in ``dtype`` (``None``: inferred from the inputs and
parameters, see :mod:`refax.nn.dtypes`).

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn.conv import Conv
  >>> layer = Conv(3, 4, kernel_size=(3, 3), strides=2, rngs=Rngs(0))
  >>> layer.kernel.shape, layer.bias.shape
  ((3, 3, 3, 4), (4,))
  >>> layer(jnp.ones((2, 8, 8, 3))).shape
  (2, 4, 4, 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from refax._module import Module
from refax._variables import Param
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.typing import (
    ConvGeneralDilatedT,
    Dtype,
    Initializer,
    LaxPadding,
    PaddingLike,
    PrecisionLike,
)

if TYPE_CHECKING:
    from refax._rngs import Rngs

__all__ = ["Conv", "ConvTranspose", "canonicalize_padding", "PaddingLike", "LaxPadding"]


default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_CONV_PADDINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")


_is_int = _checks.is_int


def canonicalize_padding(padding: PaddingLike, rank: int) -> LaxPadding:
    """Brings a padding specification to the form ``jax.lax`` convolutions accept.

    Args:
      padding: a string (returned unchanged), an int ``p`` (``(p, p)`` on every spatial dim),
        or a sequence of ``rank`` entries, each an int ``p`` (meaning ``(p, p)``) or a
        ``(low, high)`` pair.
      rank: the number of spatial dimensions.

    Returns:
      The string, or a list of ``rank`` ``(low, high)`` tuples.

    Raises:
      ValueError: ``padding`` is none of the forms above.

    Example:
      >>> from refax.nn.conv import canonicalize_padding
      >>> canonicalize_padding(1, 2)
      [(1, 1), (1, 1)]
      >>> canonicalize_padding([2, (0, 1)], 2)
      [(2, 2), (0, 1)]
      >>> canonicalize_padding('SAME', 3)
      'SAME'
    """
    if isinstance(padding, str):
        return padding
    if _is_int(padding):
        p = int(padding)  # type: ignore[arg-type]
        return [(p, p)] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs: list[tuple[int, int]] = []
        for p in padding:
            if _is_int(p):
                pairs.append((int(p), int(p)))  # type: ignore[arg-type]
            elif (
                isinstance(p, Sequence)
                and not isinstance(p, str)
                and len(p) == 2
                and all(_is_int(q) for q in p)
            ):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        else:
            return pairs
    raise ValueError(
        f"Invalid padding format: {padding!r}, should be str, int, or a sequence of len {rank} "
        "where each element is an int or pair of ints."
    )


def _freeze(x: Any) -> Any:
    """Lists to tuples (recursively), so configuration attributes stay hashable."""
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


def _as_kernel_size(kernel_size: int | Sequence[int], layer: str) -> tuple[int, ...]:
    size = _checks.positive_ints(
        layer,
        "kernel_size",
        kernel_size,
        "Pass the window size, e.g. 3 for 1-D or (3, 3) for 2-D convolutions.",
        per="one per spatial dim",
    )
    assert size is not None
    return tuple(int(k) for k in size)


def _check_config(
    layer: str,
    in_features: Any,
    out_features: Any,
    kernel_size: tuple[int, ...],
    padding: Any,
    per_dim: Mapping[str, Any],
) -> None:
    """Constructor checks shared by Conv and ConvTranspose (kernel_size already checked)."""
    _checks.positive_int(
        layer, "in_features", in_features, "Pass the size of the inputs' last (channel) axis."
    )
    _checks.positive_int(layer, "out_features", out_features, "Pass the number of output channels.")
    n = len(kernel_size)
    for name, value in per_dim.items():
        _checks.positive_ints(
            layer,
            name,
            value,
            "Use values >= 1: one int for every spatial dim, or one int per dim (None: 1).",
            allow_none=True,
            length=n,
            per=f"one per spatial dim of kernel_size={kernel_size}",
        )
    strides = _broadcast(per_dim.get("strides"), n, "strides", layer)
    if isinstance(padding, str):
        _padding_mode(layer, padding, kernel_size, strides)
    else:
        _canonical_padding(layer, padding, n)


def _padding_mode(
    layer: str, padding: str, kernel_size: tuple[int, ...], strides: tuple[int, ...]
) -> str:
    """The upper-cased padding string, or an error if ``layer`` does not implement it."""
    mode = padding.upper()
    if layer == "Conv":
        if mode not in _CONV_PADDINGS:
            raise ValueError(
                f"Conv: unknown padding {padding!r}; expected one of 'SAME', 'VALID', "
                "'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'CAUSAL', an int or one int or "
                "(low, high) pair per spatial dim."
            )
        if mode == "CAUSAL" and len(kernel_size) != 1:
            raise ValueError(
                "Conv: 'CAUSAL' padding is only implemented for 1-D convolutions, got "
                f"kernel_size={kernel_size}. Pad the inputs explicitly instead."
            )
    elif not (
        mode in ("SAME", "VALID", "CIRCULAR") or (mode == "SAME_LOWER" and set(strides) <= {1})
    ):
        raise ValueError(
            f"{layer}: unsupported padding {padding!r} (with strides {strides}); expected "
            "'SAME', 'VALID', 'CIRCULAR', an int or one int or (low, high) pair per spatial "
            "dim ('SAME_LOWER' only with unit strides)."
        )
    return mode


def _canonical_padding(layer: str, padding: Any, n: int) -> list[tuple[int, int]]:
    try:
        pads = canonicalize_padding(padding, n)
    except ValueError as e:
        raise ValueError(f"{layer}: {e}") from None
    assert not isinstance(pads, str)
    return list(pads)


def _broadcast(x: int | Sequence[int] | None, n: int, name: str, layer: str) -> tuple[int, ...]:
    if x is None:
        x = 1
    if _is_int(x):
        return (int(x),) * n  # type: ignore[arg-type]
    out = tuple(x)  # type: ignore[arg-type]
    if len(out) != n or not all(_is_int(v) for v in out):
        raise ValueError(
            f"{layer}: {name} must be an int or a sequence of {n} ints (one per spatial dim of "
            f"kernel_size), got {x!r}."
        )
    return tuple(int(v) for v in out)


def _channels_last_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """``(N, *spatial, C)`` inputs/outputs and ``(*spatial, I, O)`` kernels as lax specs."""
    spatial = tuple(range(1, ndim - 1))
    lhs = (0, ndim - 1) + spatial
    rhs = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _check_inputs(
    inputs: jax.Array, kernel_size: tuple[int, ...], in_features: int, layer: str
) -> None:
    n = len(kernel_size)
    if inputs.ndim < n + 1:
        raise ValueError(
            f"{layer} with kernel_size={kernel_size} expects inputs of shape "
            f"(*batch_dims, {n} spatial dims, in_features={in_features}), i.e. rank >= {n + 1}; "
            f"got inputs of shape {inputs.shape} (rank {inputs.ndim})."
        )
    if inputs.shape[-1] != in_features:
        raise ValueError(
            f"{layer} expects inputs whose last (feature) axis has size in_features="
            f"{in_features}, got inputs of shape {inputs.shape}."
        )


def _flatten_batch(inputs: jax.Array, n: int) -> tuple[jax.Array, tuple[int, ...] | None]:
    """Reshapes to exactly one leading batch axis; returns the batch shape to restore (or None)."""
    n_batch = inputs.ndim - (n + 1)
    if n_batch == 1:
        return inputs, None
    batch_shape = inputs.shape[:n_batch]
    flat = (int(np.prod(batch_shape)),) + inputs.shape[n_batch:]
    return jnp.reshape(inputs, flat), batch_shape


def _restore_batch(y: jax.Array, batch_shape: tuple[int, ...] | None) -> jax.Array:
    if batch_shape is None:
        return y
    return jnp.reshape(y, batch_shape + y.shape[1:])


def _check_mask(mask: Any, kernel_shape: tuple[int, ...], layer: str) -> None:
    if mask is not None and tuple(np.shape(mask)) != tuple(kernel_shape):
        raise ValueError(
            f"{layer}: mask needs to have the same shape as the kernel, expected {kernel_shape}, "
            f"got mask of shape {tuple(np.shape(mask))}."
        )


def _check_window_fits(
    layer: str,
    padding: Any,
    in_sizes: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilated_in: Sequence[int],
    dilated_kernel: Sequence[int],
) -> None:
    """Raises when a (non-empty) spatial axis is padded to less than one kernel window."""
    for axis, (size, (lo, hi), d_in, d_k) in enumerate(
        zip(in_sizes, pads, dilated_in, dilated_kernel)
    ):
        if size > 0 and d_in + lo + hi < d_k:
            raise ValueError(
                f"{layer}: padding {padding!r} leaves no complete kernel window along spatial "
                f"axis {axis}: the input size {size} (after dilation {d_in}) padded by "
                f"({lo}, {hi}) is smaller than the dilated kernel size {d_k}. Use a larger "
                "input, more padding (e.g. 'SAME') or a smaller kernel/dilation."
            )


class Conv(Module):
    """N-D convolution (``lax.conv_general_dilated``) over channels-last inputs.

    Args:
      in_features: number of input features (size of the last input axis).
      out_features: number of output features.
      kernel_size: window size, an int (1-D) or one int per spatial dim.
      strides: int or one int per spatial dim: the inter-window strides (``None`` means 1).
      padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, ``'CIRCULAR'`` (periodic),
        ``'REFLECT'`` (mirror), ``'CAUSAL'`` (1-D only: left padding, same-size output), an
        int, or one int or ``(low, high)`` pair per spatial dim.
      input_dilation: int or one int per spatial dim: dilation of the inputs (a convolution with
        input dilation ``d`` is a transposed convolution with stride ``d``).
      kernel_dilation: int or one int per spatial dim: dilation of the kernel ("atrous").
      feature_group_count: splits the features into this many groups convolved separately;
        it must divide ``in_features`` and ``out_features``.
      use_bias: whether to add a bias (Param ``bias`` of shape ``(out_features,)``).
      mask: optional array of the kernel's shape multiplied into the kernel at every call.
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: dtype of the parameters.
      precision: numerical precision of the convolution (see ``jax.lax.Precision``).
      kernel_init: initializer of the kernel.
      bias_init: initializer of the bias.
      conv_general_dilated: the ``lax.conv_general_dilated``-compatible function to call.
      promote_dtype: function casting ``(inputs, kernel, bias)`` to the computation dtype.
      preferred_element_type: accumulation/output dtype passed to the convolution.
      rngs: random streams; the kernel and bias keys come from ``rngs.params``.
      kernel_metadata: metadata of the ``kernel`` Param.
      bias_metadata: metadata of the ``bias`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn.conv import Conv
      >>> layer = Conv(3, 4, kernel_size=3, padding='VALID', rngs=Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((1, 8, 3))).shape
      ((3, 3, 4), (1, 6, 4))
      >>> layer = Conv(6, 4, (3,), padding='CAUSAL', feature_group_count=2, rngs=Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((8, 6))).shape  # no batch dim
      ((3, 3, 4), (8, 4))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: None | int | Sequence[int] = 1,
        *,
        padding: PaddingLike = "SAME",
        input_dilation: None | int | Sequence[int] = 1,
        kernel_dilation: None | int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: jax.Array | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        conv_general_dilated: ConvGeneralDilatedT = lax.conv_general_dilated,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        kernel_size = _as_kernel_size(kernel_size, "Conv")
        per_dim = dict(
            strides=strides, input_dilation=input_dilation, kernel_dilation=kernel_dilation
        )
        _check_config("Conv", in_features, out_features, kernel_size, padding, per_dim)
        _checks.positive_int(
            "Conv",
            "feature_group_count",
            feature_group_count,
            "Pass 1 for a dense convolution, or a number of groups dividing both in_features "
            "and out_features.",
        )
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if value % feature_group_count:
                raise ValueError(
                    f"Conv: feature_group_count={feature_group_count} must divide {name}="
                    f"{value}; choose a group count that divides both in_features and "
                    "out_features."
                )
        kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
        _check_mask(mask, kernel_shape, "Conv")

        kernel_key = rngs.params()
        self.kernel_shape = kernel_shape
        self.kernel = Param(kernel_init(kernel_key, kernel_shape, param_dtype), **kernel_metadata)
        self.bias: Param | None = None
        if use_bias:
            bias_key = rngs.params()
            self.bias = Param(bias_init(bias_key, (out_features,), param_dtype), **bias_metadata)

        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.strides = _freeze(strides)
        self.padding = _freeze(padding)
        self.input_dilation = _freeze(input_dilation)
        self.kernel_dilation = _freeze(kernel_dilation)
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.conv_general_dilated = conv_general_dilated
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Convolves ``inputs`` of shape ``(*batch_dims, *spatial_dims, in_features)``.

        Args:
          inputs: channels-last inputs; zero or more leading batch dims.
          out_sharding: optional sharding of the output, passed to ``conv_general_dilated``.

        Returns:
          Array of shape ``(*batch_dims, *spatial_out, out_features)``.
        """
        inputs = jnp.asarray(inputs)
        kernel_size = self.kernel_size
        n = len(kernel_size)
        _check_inputs(inputs, kernel_size, self.in_features, "Conv")
        inputs, batch_shape = _flatten_batch(inputs, n)

        strides = _broadcast(self.strides, n, "strides", "Conv")
        input_dilation = _broadcast(self.input_dilation, n, "input_dilation", "Conv")
        kernel_dilation = _broadcast(self.kernel_dilation, n, "kernel_dilation", "Conv")
        dilated_kernel = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]

        padding: Any
        if isinstance(self.padding, str):
            mode = _padding_mode("Conv", self.padding, kernel_size, strides)
            if mode in ("CIRCULAR", "REFLECT"):
                widths = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated_kernel] + [(0, 0)]
                np_mode = "wrap" if mode == "CIRCULAR" else "reflect"
                inputs = jnp.pad(inputs, widths, mode=np_mode)
                padding = "VALID"
            elif mode == "CAUSAL":
                inputs = jnp.pad(inputs, [(0, 0), (dilated_kernel[0] - 1, 0), (0, 0)])
                padding = "VALID"
            else:
                padding = mode
        else:
            padding = _canonical_padding("Conv", self.padding, n)
        in_sizes = inputs.shape[1:-1]
        dilated_in = [max(s - 1, 0) * d + 1 for s, d in zip(in_sizes, input_dilation)]
        if isinstance(padding, str) and any(d != 1 for d in input_dilation):
            # lax only takes string padding without input dilation: resolve it on the dilated
            # input shape, which is what 'SAME' / 'VALID' mean there.
            padding = lax.padtype_to_pads(dilated_in, dilated_kernel, strides, padding)
        if not isinstance(padding, str):
            _check_window_fits("Conv", self.padding, in_sizes, padding, dilated_in, dilated_kernel)
        elif padding == "VALID":
            pads = [(0, 0)] * n
            _check_window_fits("Conv", self.padding, in_sizes, pads, dilated_in, dilated_kernel)

        kernel = self.kernel[...]
        _check_mask(self.mask, tuple(kernel.shape), "Conv")
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)

        kwargs: dict[str, Any] = {}
        if out_sharding is not None:
            kwargs["out_sharding"] = out_sharding
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        y = self.conv_general_dilated(
            inputs,
            kernel,
            strides,
            padding,
            lhs_dilation=input_dilation,
            rhs_dilation=kernel_dilation,
            dimension_numbers=_channels_last_dimension_numbers(inputs.ndim),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
            **kwargs,
        )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return _restore_batch(y, batch_shape)


def _wrap_periodic(y: jax.Array, periods: Sequence[int], extra_on_right: bool) -> jax.Array:
    """Folds every spatial axis of ``y`` onto ``period`` positions by summing the overlaps.

    Each axis is first zero-padded to an odd number of periods, centred on the data (the odd
    element of the padding goes right when ``extra_on_right``, else left), so the start of the
    data lands on a period boundary; the periods are then summed.
    """
    for axis, period in enumerate(periods, start=1):
        extra = (period - y.shape[axis]) % (2 * period)
        left = extra // 2 if extra_on_right else (extra + 1) // 2
        widths = [(0, 0)] * y.ndim
        widths[axis] = (left, extra - left)
        y = jnp.pad(y, widths)
        y = jnp.reshape(y, y.shape[:axis] + (-1, period) + y.shape[axis + 1 :]).sum(axis=axis)
    return y


class ConvTranspose(Module):
    """N-D transposed convolution (``lax.conv_transpose``) over channels-last inputs.

    Args:
      in_features: number of input features (size of the last input axis).
      out_features: number of output features.
      kernel_size: window size, an int (1-D) or one int per spatial dim.
      strides: int or one int per spatial dim (``None`` means 1): the input dilation of the
        underlying convolution, i.e. the upsampling factor.
      padding: ``'SAME'`` (output size ``input * stride``), ``'VALID'`` (pads
        ``dilated_kernel - 1``, the inverse shape change of a ``'VALID'`` :class:`Conv`),
        ``'CIRCULAR'`` (periodic output of size ``input * stride``), an int, or
        one int or ``(low, high)`` pair per spatial dim applied to the stride-dilated input.
        Unlike PyTorch, explicit padding is not ``dilation * (kernel_size - 1) - padding``.
      kernel_dilation: int or one int per spatial dim: dilation of the kernel.
      use_bias: whether to add a bias (Param ``bias`` of shape ``(out_features,)``).
      mask: optional array of the kernel's shape multiplied into the kernel at every call.
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: dtype of the parameters.
      precision: numerical precision of the convolution.
      kernel_init: initializer of the kernel.
      bias_init: initializer of the bias.
      transpose_kernel: if True the kernel has shape ``kernel_size + (out_features,
        in_features)`` and is flipped spatially and transposed, giving the exact gradient
        (transpose) of a :class:`Conv` with the same kernel.
      promote_dtype: function casting ``(inputs, kernel, bias)`` to the computation dtype.
      preferred_element_type: accumulation/output dtype passed to ``lax.conv_transpose``.
      rngs: random streams; the kernel and bias keys come from ``rngs.params``.
      kernel_metadata: metadata of the ``kernel`` Param.
      bias_metadata: metadata of the ``bias`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn.conv import ConvTranspose
      >>> layer = ConvTranspose(3, 4, kernel_size=(3,), padding='VALID', rngs=Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((1, 8, 3))).shape
      ((3, 3, 4), (1, 10, 4))
      >>> layer = ConvTranspose(3, 4, (3, 3), strides=2, padding='CIRCULAR', rngs=Rngs(0))
      >>> layer(jnp.ones((5, 5, 3))).shape
      (10, 10, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        *,
        padding: PaddingLike = "SAME",
        kernel_dilation: int | Sequence[int] | None = None,
        use_bias: bool = True,
        mask: jax.Array | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike | None = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        transpose_kernel: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        kernel_size = _as_kernel_size(kernel_size, "ConvTranspose")
        per_dim = dict(strides=strides, kernel_dilation=kernel_dilation)
        _check_config("ConvTranspose", in_features, out_features, kernel_size, padding, per_dim)
        if transpose_kernel:
            kernel_shape = kernel_size + (out_features, in_features)
        else:
            kernel_shape = kernel_size + (in_features, out_features)
        _check_mask(mask, kernel_shape, "ConvTranspose")

        self.kernel_size = kernel_size
        self.in_features = in_features
        self.out_features = out_features
        self.strides = _freeze(strides)
        self.padding = _freeze(padding)
        self.kernel_dilation = _freeze(kernel_dilation)
        self.use_bias = use_bias
        self.mask = mask
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.transpose_kernel = transpose_kernel
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.kernel_shape = kernel_shape

        self.kernel = Param(
            kernel_init(rngs.params(), kernel_shape, param_dtype), **kernel_metadata
        )
        self.bias: Param | None = None
        if use_bias:
            self.bias = Param(
                bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata
            )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the transposed convolution to ``(*batch_dims, *spatial_dims, in_features)``.

        Returns:
          Array of shape ``(*batch_dims, *spatial_out, out_features)``.
        """
        inputs = jnp.asarray(inputs)
        kernel_size = self.kernel_size
        n = len(kernel_size)
        _check_inputs(inputs, kernel_size, self.in_features, "ConvTranspose")
        inputs, batch_shape = _flatten_batch(inputs, n)

        strides = _broadcast(self.strides, n, "strides", "ConvTranspose")
        kernel_dilation = _broadcast(self.kernel_dilation, n, "kernel_dilation", "ConvTranspose")

        circular = False
        padding: Any
        if isinstance(self.padding, str):
            mode = _padding_mode("ConvTranspose", self.padding, kernel_size, strides)
            circular = mode == "CIRCULAR"
            padding = "VALID" if circular else mode
        else:
            padding = _canonical_padding("ConvTranspose", self.padding, n)
            in_sizes = inputs.shape[1:-1]
            dilated_in = [(s - 1) * st + 1 for s, st in zip(in_sizes, strides)]
            dilated_kernel = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
            _check_window_fits(
                "ConvTranspose", self.padding, in_sizes, padding, dilated_in, dilated_kernel
            )

        kernel = self.kernel[...]
        _check_mask(self.mask, tuple(kernel.shape), "ConvTranspose")
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)

        y = lax.conv_transpose(
            inputs,
            kernel,
            strides,
            padding,
            rhs_dilation=kernel_dilation,
            dimension_numbers=_channels_last_dimension_numbers(inputs.ndim),
            transpose_kernel=self.transpose_kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        if circular:
            periods = [s * st for s, st in zip(inputs.shape[1:-1], strides)]
            y = _wrap_periodic(y, periods, extra_on_right=self.transpose_kernel)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return _restore_batch(y, batch_shape)
