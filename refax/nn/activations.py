"""Activation functions, and the parametric :class:`PReLU` layer.

The functions are :mod:`jax.nn`'s (``tanh`` is ``jnp.tanh``), re-exported so models can write
``nnx.relu`` or ``nnx.gelu``. ``gelu`` uses the tanh approximation by default, as in JAX.

Example:
  >>> import jax.numpy as jnp
  >>> from refax.nn import activations
  >>> activations.relu(jnp.array([-1.0, 2.0]))
  Array([0., 2.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import celu as celu
from jax.nn import elu as elu
from jax.nn import gelu as gelu
from jax.nn import glu as glu
from jax.nn import hard_sigmoid as hard_sigmoid
from jax.nn import hard_silu as hard_silu
from jax.nn import hard_swish as hard_swish
from jax.nn import hard_tanh as hard_tanh
from jax.nn import identity as identity
from jax.nn import leaky_relu as leaky_relu
from jax.nn import log_sigmoid as log_sigmoid
from jax.nn import log_softmax as log_softmax
from jax.nn import logsumexp as logsumexp
from jax.nn import one_hot as one_hot
from jax.nn import relu as relu
from jax.nn import relu6 as relu6
from jax.nn import selu as selu
from jax.nn import sigmoid as sigmoid
from jax.nn import silu as silu
from jax.nn import soft_sign as soft_sign
from jax.nn import softmax as softmax
from jax.nn import softplus as softplus
from jax.nn import standardize as standardize
from jax.nn import swish as swish

from refax._module import Module
from refax._variables import Param
from refax.nn import dtypes
from refax.nn.dtypes import PromoteDtypeFn
from refax.typing import Dtype

tanh = jnp.tanh

__all__ = [
    "PReLU",
    "celu",
    "elu",
    "gelu",
    "glu",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "hard_tanh",
    "identity",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "one_hot",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "soft_sign",
    "softmax",
    "softplus",
    "standardize",
    "swish",
    "tanh",
]


class PReLU(Module):
    """Parametric ReLU: ``x`` where ``x >= 0``, else ``negative_slope * x`` (slope learnable).

    Args:
      negative_slope_init: initial value of the slope (a scalar Param ``negative_slope``).
      dtype: computation dtype; ``None`` computes in the dtype of the inputs.
      param_dtype: dtype of the slope parameter.
      promote_dtype: function casting ``(inputs, negative_slope)`` to one dtype.
      negative_slope_metadata: metadata of the ``negative_slope`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax.nn import PReLU
      >>> layer = PReLU(negative_slope_init=0.1)
      >>> layer(jnp.array([-2.0, 3.0]))
      Array([-0.2,  3. ], dtype=float32)
    """

    def __init__(
        self,
        negative_slope_init: float = 0.01,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        negative_slope_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self.negative_slope = Param(
            jnp.asarray(negative_slope_init, dtype=param_dtype), **negative_slope_metadata
        )
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.promote_dtype = promote_dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the activation elementwise."""
        inputs = jnp.asarray(inputs)
        dtype = self.dtype if self.dtype is not None else inputs.dtype
        inputs, slope = self.promote_dtype(
            (inputs, self.negative_slope[...]), dtype=dtype, inexact=False
        )
        return jnp.where(inputs >= 0, inputs, slope * inputs)
