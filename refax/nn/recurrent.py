"""Recurrent layers: RNN cells, :class:`RNN` to run a cell over time, and :class:`Bidirectional`.

A *cell* computes one time step: ``new_carry, output = cell(carry, inputs_t)``. The carry is
the recurrent state (``(c, h)`` for the LSTMs, ``h`` for the others) and starts from
``cell.initialize_carry(input_shape, rngs)`` (zeros unless a ``carry_init`` is given). Every
cell keeps its weights in ``Linear`` sub-layers, so parameter paths read ``cell.ii.kernel`` or
``cell.dense_h.bias``; the input layers get ``kernel_init`` (LeCun normal) and the recurrent
ones ``recurrent_kernel_init`` (orthogonal).

:class:`RNN` scans a cell over the time axis of a batch of sequences with ``jax.lax.scan``.
The cell travels through the scan as its ``(GraphDef, State)``: it is merged back into a
Module at each step, and the State it ends with is written back into the cell, so Variable
updates made by the cell (counters, RNG streams, sown values) are kept, as with any refax
Module call.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn.recurrent import LSTMCell, RNN
  >>> cell = LSTMCell(3, 4, rngs=Rngs(0))
  >>> carry = cell.initialize_carry((2, 3), Rngs(1))  # batch of 2, 3 input features
  >>> carry, y = cell(carry, jnp.ones((2, 3)))
  >>> y.shape
  (2, 4)
  >>> rnn = RNN(cell)
  >>> rnn(jnp.ones((2, 5, 3))).shape  # (batch, time, features)
  (2, 5, 4)
"""

from __future__ import annotations

import functools
import logging
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from refax._filters import All, to_predicate
from refax._graph import iter_graph
from refax._module import Module
from refax._rngs import Rngs, RngState, RngStream
from refax._transforms._jit import jit
from refax._transforms._prefix import Carry as CarryMarker
from refax._transforms._prefix import StateAxes
from refax._transforms._scan import scan
from refax._variables import Variable, _set_raw
from refax.nn import _checks, dtypes, initializers
from refax.nn.activations import sigmoid, tanh
from refax.nn.dtypes import PromoteDtypeFn
from refax.nn.linear import Linear
from refax.typing import Dtype, Filter, Initializer, Shape

__all__ = [
    "RNNCellBase",
    "LSTMCell",
    "OptimizedLSTMCell",
    "GRUCell",
    "SimpleCell",
    "RNNBase",
    "RNN",
    "Bidirectional",
    "flip_sequences",
    "modified_orthogonal",
]

Array = jax.Array
Carry = Any
Output = Any

_logger = logging.getLogger(__name__)
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
default_kernel_init = initializers.lecun_normal()
default_recurrent_kernel_init = initializers.orthogonal()
default_bias_init = initializers.zeros_init()
_orthogonal = initializers.orthogonal()


def modified_orthogonal(key: Array, shape: Shape, dtype: Dtype = jnp.float32) -> Array:
    """Orthogonal initializer that works for half precision dtypes.

    The matrix is drawn in ``float32`` (QR decompositions are not available in ``float16`` or
    ``bfloat16``) and cast to ``dtype`` afterwards. It is :class:`LSTMCell`'s default
    ``recurrent_kernel_init``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = modified_orthogonal(jax.random.key(0), (3, 3), jnp.bfloat16)
      >>> w.dtype
      dtype(bfloat16)
      >>> bool(jnp.allclose(w.astype(jnp.float32) @ w.T.astype(jnp.float32), jnp.eye(3),
      ...                   atol=1e-2))
      True
    """
    return _orthogonal(key, shape, jnp.float32).astype(dtype)


# -- cells ------------------------------------------------------------------------------------
class RNNCellBase(Module):
    """Base class of recurrent cells: one time step ``(carry, x_t) -> (new_carry, y_t)``.

    Subclasses implement ``__call__``, :meth:`initialize_carry` and :attr:`num_feature_axes`
    (how many trailing axes of the inputs are features; :class:`RNN` treats the axis before
    them as time and the ones before that as batch).
    """

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: Rngs | RngStream | None = None,
        carry_init: Initializer | None = None,
    ) -> Carry:
        """Returns the initial carry for inputs of shape ``input_shape`` (batch + features).

        Args:
          input_shape: shape of one time step of the inputs, e.g. ``(batch, in_features)``.
          rngs: keys for ``carry_init``; an ``Rngs`` gives its ``carry`` stream.
          carry_init: initializer of the carry (default: the cell's, else zeros).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement initialize_carry.")

    def __call__(self, carry: Carry, inputs: Array) -> tuple[Carry, Array]:
        """Runs one step; returns ``(new_carry, output)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__.")

    @property
    def num_feature_axes(self) -> int:
        """Number of trailing feature axes of the inputs (1 for vector inputs)."""
        raise NotImplementedError(f"{type(self).__name__} must implement num_feature_axes.")


class _DenseCell(RNNCellBase):
    """Plumbing shared by the built-in cells: vector inputs, carries of ``hidden_features``."""

    _num_carries = 1  # arrays in the carry: (c, h) for the LSTMs

    def _setup(
        self,
        in_features: int,
        hidden_features: int,
        dtype: Dtype | None,
        param_dtype: Dtype,
        promote_dtype: PromoteDtypeFn,
        keep_rngs: bool,
        rngs: Rngs,
    ) -> None:
        layer = type(self).__name__
        _checks.positive_int(
            layer, "in_features", in_features, "Pass the size of the inputs' last axis."
        )
        _checks.positive_int(
            layer,
            "hidden_features",
            hidden_features,
            "Pass the size of the hidden state (the carry and the output).",
        )
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype
        if keep_rngs:
            warnings.warn(
                f"{type(self).__name__}: keep_rngs is deprecated; pass rngs to "
                "initialize_carry or to the RNN call instead.",
                stacklevel=3,
            )
            self.rngs = rngs.carry.fork()
        else:
            self.rngs = None

    def _dense(
        self,
        n_in: int,
        n_out: int,
        rngs: Rngs,
        init: Initializer,
        metadata: Mapping[str, Any],
        bias_init: Initializer | None = None,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ) -> Linear:
        """A Linear in the cell's dtypes, with a bias iff ``bias_init`` is given."""
        return Linear(
            n_in,
            n_out,
            use_bias=bias_init is not None,
            kernel_init=init,
            bias_init=default_bias_init if bias_init is None else bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            promote_dtype=self.promote_dtype,
            rngs=rngs,
            kernel_metadata=metadata,
            bias_metadata=bias_metadata,
        )

    def _set_carry_init(self, carry_init: Initializer | None) -> None:
        if carry_init:
            warnings.warn(
                f"{type(self).__name__}: carry_init given to __init__; pass it to "
                "initialize_carry instead (an initializer stored on the cell becomes part of "
                "its GraphDef, so otherwise identical cells get different GraphDefs).",
                stacklevel=3,
            )
        self.carry_init = carry_init

    def _check_step(self, inputs: Any, hidden: Any) -> None:
        name = type(self).__name__
        shape = np.shape(inputs)
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ValueError(
                f"{name} expects inputs whose last axis has size in_features="
                f"{self.in_features}, got inputs of shape {shape}."
            )
        hshape = np.shape(hidden)
        if len(hshape) == 0 or hshape[-1] != self.hidden_features:
            raise ValueError(
                f"{name} expects a carry whose last axis has size hidden_features="
                f"{self.hidden_features}, got a carry of shape {hshape}; create it with "
                f"{name}.initialize_carry(input_shape, rngs)."
            )

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: Rngs | RngStream | None = None,
        carry_init: Initializer | None = None,
    ) -> Any:
        """Returns the initial carry: ``(c, h)`` for the LSTM cells, ``h`` for the others.

        Each array has shape ``input_shape[:-1] + (hidden_features,)`` and dtype
        ``param_dtype``, and draws one key from the stream.

        Args:
          input_shape: shape of one time step of the inputs, e.g. ``(batch, in_features)``.
          rngs: an ``Rngs`` (its ``carry`` stream is used) or an ``RngStream``; default: the
            stream kept with ``keep_rngs``.
          carry_init: initializer of the carry (default: the one given to ``__init__``, else
            zeros).
        """
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, Rngs):
            rngs = rngs.carry
        if rngs is None:
            raise ValueError(
                f"{type(self).__name__}.initialize_carry needs RNGs: pass rngs=nnx.Rngs(...) "
                "(or an RngStream); RNN passes its own stream."
            )
        if carry_init is None:
            carry_init = self.carry_init if self.carry_init is not None else initializers.zeros
        shape = tuple(input_shape)[:-1] + (self.hidden_features,)
        carry = tuple(carry_init(rngs(), shape, self.param_dtype) for _ in range(self._num_carries))
        return carry if self._num_carries > 1 else carry[0]

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTMCell(_DenseCell):
    r"""Long short-term memory cell, with one ``Linear`` per gate.

    .. math::
        i = \sigma(W_{ii} x + W_{hi} h + b_{hi}), \quad
        f = \sigma(W_{if} x + W_{hf} h + b_{hf}), \\
        g = \tanh(W_{ig} x + W_{hg} h + b_{hg}), \quad
        o = \sigma(W_{io} x + W_{ho} h + b_{ho}), \\
        c' = f c + i g, \quad h' = o \tanh(c').

    The input layers ``ii, if_, ig, io`` have no bias (it would add to the recurrent one);
    the recurrent layers ``hi, hf, hg, ho`` do. The carry is ``(c, h)``; the output is ``h'``.

    Args:
      in_features: size of the last axis of the inputs.
      hidden_features: size of the hidden and cell states.
      gate_fn: gate activation (sigmoid).
      activation_fn: activation of the candidate and of the output (tanh).
      kernel_init: initializer of the input kernels (LeCun normal).
      recurrent_kernel_init: initializer of the recurrent kernels
        (:func:`modified_orthogonal`).
      bias_init: initializer of the recurrent biases (zeros).
      dtype: computation dtype (``None``: inferred).
      param_dtype: dtype of the parameters and of the initial carry.
      carry_init: deprecated here, pass it to :meth:`initialize_carry`.
      promote_dtype: function casting each Linear's ``(inputs, kernel, bias)``.
      keep_rngs: deprecated; stores a fork of ``rngs.carry`` for :meth:`initialize_carry`.
      rngs: random streams; parameters draw from ``rngs.params`` in attribute order.
      kernel_metadata: metadata of the input kernels.
      recurrent_kernel_metadata: metadata of the recurrent kernels.
      bias_metadata: metadata of the biases.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> cell = LSTMCell(3, 4, rngs=Rngs(0))
      >>> cell.ii.kernel.shape, cell.hi.kernel.shape, cell.hi.bias.shape
      ((3, 4), (4, 4), (4,))
      >>> (c, h), y = cell(cell.initialize_carry((3,), Rngs(0)), jnp.ones(3))
      >>> c.shape, bool((h == y).all())
      ((4,), True)
    """

    _num_carries = 2

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = sigmoid,
        activation_fn: Callable[..., Any] = tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = modified_orthogonal,
        bias_init: Initializer = default_bias_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        keep_rngs: bool = False,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._setup(
            in_features, hidden_features, dtype, param_dtype, promote_dtype, keep_rngs, rngs
        )
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        n_in, n_h = in_features, hidden_features
        # Creation order fixes which key each parameter gets: inputs first, then recurrent.
        self.ii, self.if_, self.ig, self.io = (
            self._dense(n_in, n_h, rngs, kernel_init, kernel_metadata) for _ in range(4)
        )
        self.hi, self.hf, self.hg, self.ho = (
            self._dense(
                n_h,
                n_h,
                rngs,
                recurrent_kernel_init,
                recurrent_kernel_metadata,
                bias_init,
                bias_metadata,
            )
            for _ in range(4)
        )
        self._set_carry_init(carry_init)

    def __call__(
        self, carry: tuple[Array, Array], inputs: Array
    ) -> tuple[tuple[Array, Array], Array]:
        """One LSTM step: returns ``((new_c, new_h), new_h)``."""
        c, h = carry
        self._check_step(inputs, h)
        i = self.gate_fn(self.ii(inputs) + self.hi(h))
        f = self.gate_fn(self.if_(inputs) + self.hf(h))
        g = self.activation_fn(self.ig(inputs) + self.hg(h))
        o = self.gate_fn(self.io(inputs) + self.ho(h))
        new_c = f * c + i * g
        new_h = o * self.activation_fn(new_c)
        return (new_c, new_h), new_h


class OptimizedLSTMCell(_DenseCell):
    """LSTM cell computing the four gates with two fused matmuls (same math as LSTMCell).

    ``dense_i`` (no bias) maps the inputs and ``dense_h`` (with bias) the hidden state to
    ``4 * hidden_features`` values, split into the ``i, f, g, o`` gates in that order. Usually
    faster than :class:`LSTMCell` for hidden sizes up to a few thousand. The arguments are
    :class:`LSTMCell`'s, except that ``recurrent_kernel_init`` defaults to
    ``initializers.orthogonal()``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> cell = OptimizedLSTMCell(3, 4, rngs=Rngs(0))
      >>> cell.dense_i.kernel.shape, cell.dense_h.kernel.shape
      ((3, 16), (4, 16))
      >>> carry, y = cell(cell.initialize_carry((2, 3), Rngs(0)), jnp.ones((2, 3)))
      >>> y.shape
      (2, 4)
    """

    _num_carries = 2

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = sigmoid,
        activation_fn: Callable[..., Any] = tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
        bias_init: Initializer = default_bias_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        keep_rngs: bool = False,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._setup(
            in_features, hidden_features, dtype, param_dtype, promote_dtype, keep_rngs, rngs
        )
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        n_h4 = 4 * hidden_features
        self.dense_i = self._dense(in_features, n_h4, rngs, kernel_init, kernel_metadata)
        self.dense_h = self._dense(
            hidden_features,
            n_h4,
            rngs,
            recurrent_kernel_init,
            recurrent_kernel_metadata,
            bias_init,
            bias_metadata,
        )
        self._set_carry_init(carry_init)

    def __call__(
        self, carry: tuple[Array, Array], inputs: Array
    ) -> tuple[tuple[Array, Array], Array]:
        """One LSTM step: returns ``((new_c, new_h), new_h)``."""
        c, h = carry
        self._check_step(inputs, h)
        z = self.dense_i(inputs) + self.dense_h(h)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        new_c = self.gate_fn(f) * c + self.gate_fn(i) * self.activation_fn(g)
        new_h = self.gate_fn(o) * self.activation_fn(new_c)
        return (new_c, new_h), new_h


class SimpleCell(_DenseCell):
    r"""Elman cell: :math:`h' = \tanh(W_i x + b_i + W_h h)` (``+ h`` inside when residual).

    ``dense_i`` (with bias) maps the inputs, ``dense_h`` (no bias) the hidden state; the
    recurrent kernel is drawn first. The carry and the output are both ``h'``. The arguments
    are :class:`LSTMCell`'s (``activation_fn`` being the one activation) plus ``residual``,
    except that ``dtype`` defaults to float32 and ``recurrent_kernel_init`` to
    ``initializers.orthogonal()``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> cell = SimpleCell(3, 4, residual=True, rngs=Rngs(0))
      >>> h, y = cell(cell.initialize_carry((2, 3), Rngs(0)), jnp.ones((2, 3)))
      >>> h.shape, bool((h == y).all())
      ((2, 4), True)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        residual: bool = False,
        activation_fn: Callable[..., Any] = tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
        bias_init: Initializer = default_bias_init,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        keep_rngs: bool = False,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._setup(
            in_features, hidden_features, dtype, param_dtype, promote_dtype, keep_rngs, rngs
        )
        self.residual = residual
        self.activation_fn = activation_fn
        self.dense_h = self._dense(
            hidden_features,
            hidden_features,
            rngs,
            recurrent_kernel_init,
            recurrent_kernel_metadata,
        )
        self.dense_i = self._dense(
            in_features,
            hidden_features,
            rngs,
            kernel_init,
            kernel_metadata,
            bias_init,
            bias_metadata,
        )
        self._set_carry_init(carry_init)

    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        """One step: returns ``(new_h, new_h)``."""
        self._check_step(inputs, carry)
        z = self.dense_i(inputs) + self.dense_h(carry)
        if self.residual:
            z = z + carry
        new_h = self.activation_fn(z)
        return new_h, new_h


class GRUCell(_DenseCell):
    r"""Gated recurrent unit cell.

    .. math::
        r = \sigma(W_{ir} x + b_{ir} + W_{hr} h), \quad
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h), \\
        n = \tanh(W_{in} x + b_{in} + r (W_{hn} h)), \quad
        h' = (1 - z) n + z h.

    ``dense_i`` (with bias) and ``dense_h`` (no bias) each produce ``3 * hidden_features``
    values, split into the ``r, z, n`` parts in that order. Carry and output are ``h'``. The
    arguments are :class:`LSTMCell`'s (``bias_init`` and ``bias_metadata`` apply to the
    input bias), except that ``recurrent_kernel_init`` defaults to
    ``initializers.orthogonal()``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> cell = GRUCell(3, 4, rngs=Rngs(0))
      >>> cell.dense_i.kernel.shape, cell.dense_h.bias is None
      ((3, 12), True)
      >>> h, y = cell(cell.initialize_carry((2, 3), Rngs(0)), jnp.ones((2, 3)))
      >>> h.shape
      (2, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = sigmoid,
        activation_fn: Callable[..., Any] = tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
        bias_init: Initializer = default_bias_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        keep_rngs: bool = False,
        rngs: Rngs,
        kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._setup(
            in_features, hidden_features, dtype, param_dtype, promote_dtype, keep_rngs, rngs
        )
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        n_h3 = 3 * hidden_features
        self.dense_i = self._dense(
            in_features, n_h3, rngs, kernel_init, kernel_metadata, bias_init, bias_metadata
        )
        self.dense_h = self._dense(
            hidden_features, n_h3, rngs, recurrent_kernel_init, recurrent_kernel_metadata
        )
        self._set_carry_init(carry_init)

    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        """One GRU step: returns ``(new_h, new_h)``."""
        h = carry
        self._check_step(inputs, h)
        x_r, x_z, x_n = jnp.split(self.dense_i(inputs), 3, axis=-1)
        h_r, h_z, h_n = jnp.split(self.dense_h(h), 3, axis=-1)
        r = self.gate_fn(x_r + h_r)
        z = self.gate_fn(x_z + h_z)
        n = self.activation_fn(x_n + r * h_n)
        new_h = (1.0 - z) * n + z * h
        return new_h, new_h


# -- sequences --------------------------------------------------------------------------------
def flip_sequences(
    inputs: Array, seq_lengths: Array | None, num_batch_dims: int, time_major: bool
) -> Array:
    """Reverses each sequence along the time axis, keeping padding at the end.

    Without ``seq_lengths`` this is ``jnp.flip`` along the time axis. With them, step ``t``
    of the result is step ``(length - 1 - t) mod T`` of the input: the first ``length``
    steps hold the valid ones reversed and the padding stays behind them, so flipping twice
    restores the inputs.

    Args:
      inputs: array of shape ``batch + (T,) + features`` (``(T,) + batch + features`` when
        ``time_major``).
      seq_lengths: valid length of each sequence, of shape ``batch`` (or ``None``).
      num_batch_dims: number of batch axes.
      time_major: whether time is the leading axis.

    Returns:
      The flipped array, of the shape of ``inputs``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
      >>> flip_sequences(x, jnp.array([1, 2, 3]), num_batch_dims=1, time_major=False)
      Array([[1, 0, 0],
             [3, 2, 0],
             [6, 5, 4]], dtype=int32)
    """
    time_axis = 0 if time_major else num_batch_dims
    if seq_lengths is None:
        return jnp.flip(inputs, axis=time_axis)
    num_steps = inputs.shape[time_axis]
    lengths = jnp.asarray(seq_lengths)
    steps = jnp.arange(num_steps)
    if time_major:
        steps = steps.reshape((num_steps,) + (1,) * lengths.ndim)
        lengths = lengths[None]
    else:
        lengths = lengths[..., None]
    index = (lengths - 1 - steps) % num_steps
    index = index.reshape(index.shape + (1,) * (inputs.ndim - index.ndim))
    return jnp.take_along_axis(inputs, index, axis=time_axis)


class RNNBase(Protocol):
    """What :class:`Bidirectional` needs of its two RNNs: :class:`RNN`'s call signature."""

    def __call__(
        self,
        inputs: Array,
        *,
        initial_carry: Carry | None = None,
        rngs: Rngs | RngStream | None = None,
        seq_lengths: Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> Output | tuple[Carry, Output]: ...


def _carry_stream(rngs: Any, layer: str) -> RngStream | None:
    if rngs is True:
        return RngStream(0, tag="carry")
    if rngs is False or rngs is None:
        return None
    if isinstance(rngs, Rngs):
        return rngs.carry.fork()
    if isinstance(rngs, RngStream):
        return rngs.fork()
    if isinstance(rngs, (numbers.Integral, jax.Array, np.ndarray)):
        return RngStream(rngs, tag="carry")
    raise ValueError(
        f"{layer}: rngs must be an Rngs, an RngStream, an int or key seed, or a bool, got "
        f"{type(rngs).__name__}."
    )


def _is_carry_axis(axis: Any) -> bool:
    return axis is not None and not isinstance(axis, numbers.Integral)


@contextmanager
def _broadcast_rng_streams(cell: Any, only: Filter) -> Iterator[None]:
    """Gives each selected stream one fresh key for this call, restored on exit.

    Within the scan the streams are broadcast (read-only), so every step draws the same
    keys; drawing the fresh key advances each stream's count by one per call.
    """
    backups = []
    if only is not None:
        pred = to_predicate(only)
        for path, node in list(iter_graph(cell)):
            if isinstance(node, RngStream) and pred((*path, "count"), node.count):
                key = node()
                backups.append((node, node.key.get_value(), node.count.get_value()))
                node.key.set_value(jax.random.split(key, 1)[0])
                node.count.set_value(jnp.zeros(node.count.shape, jnp.uint32))
    try:
        yield
    finally:
        for node, key, count in backups:
            node.key.set_value(key)
            node.count.set_value(count)


def _time_mask(valid: Array, like: Array) -> Array:
    return valid.reshape(valid.shape + (1,) * (jnp.ndim(like) - valid.ndim))


class RNN(Module):
    """Runs a recurrent cell over the time axis of its inputs (a ``jax.lax.scan``).

    The inputs are ``batch + (time,) + features`` (``(time,) + batch + features`` with
    ``time_major=True``), where ``features`` has ``cell.num_feature_axes`` axes. The output
    has the cell's outputs stacked along the same time axis.

    Args:
      cell: the :class:`RNNCellBase` applied at each step.
      time_major: whether time is the leading axis of the inputs and outputs.
      return_carry: whether to return ``(final_carry, outputs)`` instead of ``outputs``.
      reverse: process the sequences from the end (respecting ``seq_lengths``).
      keep_order: with ``reverse``, flip the outputs back to the input order.
      unroll: number of steps unrolled per scan iteration (``jax.lax.scan``'s ``unroll``).
      state_axes: how the cell's Variables travel through the scan, as a mapping from
        filters to ``None`` (broadcast: every step sees the initial values and updates are
        dropped), an int (one slice along that axis per step, stacked back afterwards) or a
        carry marker such as ``nnx.Carry`` (any other value: updated from step to step and
        written back). Default: everything is carried.
      broadcast_rngs: filter of the cell's RNG streams that draw the same keys at every step
        (e.g. ``'dropout'`` for one dropout mask per sequence); they get a fresh key per call.
      rngs: source of the keys for ``cell.initialize_carry``: ``True`` (a ``carry`` stream
        seeded with 0), an ``Rngs`` (a fork of its ``carry`` stream), an RngStream (a fork),
        an int seed, or ``False`` (none: pass ``initial_carry`` or call-time ``rngs``).

    Call arguments: ``inputs``; ``initial_carry`` (default: ``cell.initialize_carry``);
    ``seq_lengths`` (valid length of each sequence, shape ``batch``: with ``return_carry``
    the carry returned is the one after each sequence's last valid step, or the initial
    carry for a length of 0; outputs past a sequence's end are computed but meaningless);
    ``rngs`` for the initial carry; and ``return_carry``, ``time_major``, ``reverse``,
    ``keep_order`` overriding the attributes.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> rnn = RNN(GRUCell(3, 4, rngs=Rngs(0)), return_carry=True)
      >>> carry, y = rnn(jnp.ones((2, 5, 3)), seq_lengths=jnp.array([5, 2]))
      >>> carry.shape, y.shape
      ((2, 4), (2, 5, 4))
      >>> bool(jnp.allclose(carry[1], y[1, 1]))  # the carry after the last valid step
      True
    """

    def __init__(
        self,
        cell: RNNCellBase,
        *,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int = 1,
        state_axes: Mapping[Any, Any] | None = None,
        broadcast_rngs: Filter = None,
        rngs: Rngs | RngStream | bool = True,
    ):
        if not isinstance(unroll, bool | np.bool_):  # lax.scan: True unrolls fully
            _checks.positive_int(
                "RNN",
                "unroll",
                unroll,
                "Pass the number of steps per scan iteration (1: no unrolling; True: all).",
            )
        if state_axes is not None and not isinstance(state_axes, Mapping):
            raise TypeError(
                f"RNN: state_axes must be a mapping from filters to axes or None, got "
                f"{state_axes!r} of type {type(state_axes).__name__}. Pass e.g. "
                "{...: nnx.Carry}."
            )
        self.cell = cell
        self.time_major = time_major
        self.return_carry = return_carry
        self.reverse = reverse
        self.keep_order = keep_order
        self.unroll = unroll
        self.rngs = _carry_stream(rngs, "RNN")
        if state_axes is None:
            state_axes = {...: "carry"}
        self.state_axes = tuple(state_axes.items())
        self.broadcast_rngs = broadcast_rngs

    def __call__(
        self,
        inputs: Array,
        *,
        initial_carry: Carry | None = None,
        seq_lengths: Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        rngs: Rngs | RngStream | None = None,
    ) -> Output | tuple[Carry, Output]:
        """Runs the cell over ``inputs``; returns the outputs (and the final carry)."""
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order

        inputs = jnp.asarray(inputs)
        num_features = self.cell.num_feature_axes
        if inputs.ndim < num_features + 1:
            raise ValueError(
                f"RNN expects inputs with a time axis and {num_features} feature axis(es) "
                f"(rank >= {num_features + 1}), got inputs of shape {inputs.shape}."
            )
        time_axis = 0 if time_major else inputs.ndim - num_features - 1
        if time_major:
            batch_shape = inputs.shape[1 : inputs.ndim - num_features]
        else:
            batch_shape = inputs.shape[:time_axis]
        if seq_lengths is not None:
            seq_lengths = jnp.asarray(seq_lengths)
            if seq_lengths.shape != batch_shape:
                raise ValueError(
                    f"RNN expects seq_lengths of the batch shape {batch_shape}, got shape "
                    f"{seq_lengths.shape} (inputs of shape {inputs.shape}, "
                    f"time_major={time_major})."
                )
        if reverse:
            inputs = flip_sequences(inputs, seq_lengths, len(batch_shape), time_major)

        if initial_carry is None:
            if rngs is None:
                rngs = self.rngs
            if isinstance(rngs, Rngs):
                rngs = rngs.carry.fork()
            step_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1 :]
            initial_carry = self.cell.initialize_carry(step_shape, rngs)

        freeze = seq_lengths is not None and return_carry
        carry, outputs = self._scan(
            initial_carry, jnp.moveaxis(inputs, time_axis, 0), seq_lengths if freeze else None
        )
        outputs = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), outputs)
        if reverse and keep_order:
            outputs = jax.tree.map(
                lambda y: flip_sequences(y, seq_lengths, len(batch_shape), time_major), outputs
            )
        return (carry, outputs) if return_carry else outputs

    def _scan(self, carry: Carry, xs: Array, seq_lengths: Array | None) -> tuple[Carry, Any]:
        """Scans the cell over the leading axis of ``xs`` (``nnx.scan``, which writes the
        carried and scanned state back into the cell)."""
        rules = self.state_axes
        if self.broadcast_rngs is not None:
            rules = ((All(RngState, self.broadcast_rngs), None), *rules)
        freeze = seq_lengths is not None
        try:
            run = _cell_scan(rules, self.unroll, freeze)
        except TypeError:  # unhashable filters: build the scan afresh on every call
            run = _cell_scan.__wrapped__(rules, self.unroll, freeze)
        start = (jnp.zeros((), jnp.int32), carry if freeze else None, seq_lengths)
        with _broadcast_rng_streams(self.cell, self.broadcast_rngs):
            (carry, (_, last, _)), outputs = run(self.cell, (carry, start), xs)
        return (last if freeze else carry), outputs


@functools.lru_cache(maxsize=64)
def _cell_scan(rules: tuple[tuple[Any, Any], ...], unroll: int | bool, freeze: bool) -> Any:
    """``nnx.jit(nnx.scan(step))`` of a cell over the leading axis of its input, for one set
    of state rules (kept, so JAX reuses the trace and the compilation).

    ``rules`` map filters to the scan axis of the cell's state: an int (scanned), ``None``
    (broadcast: every step sees the initial values, updates are dropped) or a carry marker.
    The loop state is ``(cell_carry, (step, last_valid_carry, seq_lengths))``.
    """
    axes = StateAxes({f: CarryMarker if _is_carry_axis(a) else a for f, a in rules})
    preds = tuple((to_predicate(f), a is None) for f, a in rules)
    has_broadcast = any(b for _, b in preds)

    def step(cell: Any, loop: Any, x: Any) -> tuple[Any, Any]:
        cell_carry, (t, last, seq_lengths) = loop
        kept = _broadcast_values(cell, preds) if has_broadcast else ()
        new_carry, y = cell(cell_carry, x)
        for var, value in kept:  # broadcast state: the next step sees the initial values
            _set_raw(var, value)
        if freeze:
            valid = t < seq_lengths
            last = jax.tree.map(lambda n, o: jnp.where(_time_mask(valid, n), n, o), new_carry, last)
        return (new_carry, (t + 1, last, seq_lengths)), y

    return jit(scan(step, in_axes=(axes, CarryMarker, 0), out_axes=(CarryMarker, 0), unroll=unroll))


def _broadcast_values(cell: Any, preds: tuple) -> list[tuple[Variable, Any]]:
    """The cell's Variables whose first matching rule broadcasts them, with their values."""
    kept = []
    for path, var in iter_graph(cell):
        if isinstance(var, Variable):
            for pred, broadcast in preds:
                if pred(path, var):
                    if broadcast:
                        kept.append((var, var._raw_value))
                    break
    return kept


def _concatenate(a: Array, b: Array) -> Array:
    """Concatenates the two directions' outputs along the last axis."""
    return jnp.concatenate([a, b], axis=-1)


class Bidirectional(Module):
    """Runs one RNN forwards and one backwards over the inputs and merges their outputs.

    The backward RNN is called with ``reverse=True, keep_order=True``, so both outputs are in
    input order; ``merge_fn`` (default: concatenation along the last axis) combines them.

    Args:
      forward_rnn: the RNN run in input order.
      backward_rnn: the RNN run in reverse order (use a different object unless parameters
        are meant to be shared).
      merge_fn: function combining the forward and backward outputs.
      time_major: whether time is the leading axis of the inputs.
      return_carry: whether to return ``((forward_carry, backward_carry), outputs)``.
      rngs: keys for the initial carries: ``True`` (a ``carry`` stream seeded with 0), an
        ``Rngs`` (a fork of its ``carry`` stream), an RngStream (used as is) or ``False``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> layer = Bidirectional(RNN(GRUCell(3, 4, rngs=Rngs(0))), RNN(GRUCell(3, 4, rngs=Rngs(1))))
      >>> layer(jnp.ones((2, 5, 3))).shape
      (2, 5, 8)
    """

    def __init__(
        self,
        forward_rnn: RNNBase,
        backward_rnn: RNNBase,
        *,
        merge_fn: Callable[[Array, Array], Array] = _concatenate,
        time_major: bool = False,
        return_carry: bool = False,
        rngs: Rngs | RngStream | bool = True,
    ):
        self.forward_rnn = forward_rnn
        self.backward_rnn = backward_rnn
        self.merge_fn = merge_fn
        self.time_major = time_major
        self.return_carry = return_carry
        if isinstance(rngs, RngStream):
            stream: RngStream | None = rngs
        elif rngs is True or rngs is False or isinstance(rngs, Rngs):
            stream = _carry_stream(rngs, "Bidirectional")
        else:
            raise TypeError(
                "Bidirectional: rngs must be an Rngs, an RngStream or a bool, got "
                f"{type(rngs).__name__}."
            )
        self.rngs = stream

    def __call__(
        self,
        inputs: Array,
        *,
        initial_carry: tuple[Carry, Carry] | None = None,
        rngs: Rngs | RngStream | None = None,
        seq_lengths: Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> Output | tuple[tuple[Carry, Carry], Output]:
        """Returns the merged outputs (``reverse`` and ``keep_order`` are ignored)."""
        del reverse, keep_order  # accepted for RNNBase compatibility
        time_major = self.time_major if time_major is None else time_major
        return_carry = self.return_carry if return_carry is None else return_carry
        if rngs is None:
            rngs = self.rngs
        if isinstance(rngs, Rngs):
            rngs = rngs.carry
        forward_carry, backward_carry = (None, None) if initial_carry is None else initial_carry
        if self.forward_rnn is self.backward_rnn:
            _logger.warning(
                "Bidirectional: forward_rnn and backward_rnn are the same object, so they "
                "share parameters."
            )
        common = dict(rngs=rngs, seq_lengths=seq_lengths, return_carry=True, time_major=time_major)
        carry_f, out_f = self.forward_rnn(
            inputs, initial_carry=forward_carry, reverse=False, **common
        )
        carry_b, out_b = self.backward_rnn(
            inputs, initial_carry=backward_carry, reverse=True, keep_order=True, **common
        )
        outputs = jax.tree.map(self.merge_fn, out_f, out_b)
        return ((carry_f, carry_b), outputs) if return_carry else outputs
