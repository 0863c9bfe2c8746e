"""Low-rank adapters (LoRA, Hu et al. 2021): :class:`LoRA`, :class:`LoRALinear`, :class:`LoRAParam`.

A LoRA adapter adds ``x @ lora_a @ lora_b`` to a layer's output, where ``lora_a`` has shape
``(in_features, rank)`` and ``lora_b`` ``(rank, out_features)`` with a small ``rank``.
``lora_b`` starts at zero, so an adapted model initially computes exactly what the base model
does. The adapter matrices are :class:`LoRAParam` Variables (a ``Param`` subclass), so a
filter such as ``nnx.LoRAParam`` selects them alone, e.g. to train only the adapters.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax._graph import state
  >>> from refax.nn.lora import LoRALinear, LoRAParam
  >>> layer = LoRALinear(3, 4, lora_rank=2, rngs=Rngs(0))
  >>> sorted(tuple(p) for p, _ in state(layer, LoRAParam).flat_state())
  [('lora', 'lora_a'), ('lora', 'lora_b')]
  >>> layer(jnp.ones((5, 3))).shape
  (5, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from refax._module import Module
from refax._rngs import Rngs
from refax._variables import Param, Variable
from refax.nn import _checks, dtypes, initializers
from refax.nn.dtypes import PromoteDtypeFn
from refax.nn.linear import Linear
from refax.typing import Dtype, Initializer

__all__ = ["LoRAParam", "LoRA", "LoRALinear"]

A = TypeVar("A")
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
default_a_initializer = initializers.he_uniform()
default_b_initializer = initializers.zeros


class LoRAParam(Param[A]):
    """The Param type of LoRA adapter matrices (so filters and optimizers can target them)."""

    __slots__ = ()


def _check_rank(layer: str, lora_rank: Any) -> None:
    _checks.positive_int(
        layer,
        "lora_rank",
        lora_rank,
        "Pass the rank of the adapter (the inner size of lora_a @ lora_b), e.g. 8.",
    )


class LoRA(Module):
    """A stand-alone low-rank adapter: ``x @ lora_a @ lora_b``, plus ``base_module(x)`` if given.

    Args:
      in_features: size of the last axis of the inputs.
      lora_rank: the rank of the adapter (inner size of the product).
      out_features: size of the last axis of the outputs.
      base_module: optional callable Module whose output (on the same inputs, after dtype
        promotion, with the call's keyword arguments) is added.
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: dtype of the adapter matrices.
      a_initializer: initializer of ``lora_a`` (He uniform).
      b_initializer: initializer of ``lora_b`` (zeros).
      lora_param_type: Variable type of the adapter matrices.
      promote_dtype: function casting ``(x, lora_a, lora_b)`` to the computation dtype.
      rngs: random streams; ``lora_a`` then ``lora_b`` draw from ``rngs.params``.
      a_metadata: metadata of ``lora_a``.
      b_metadata: metadata of ``lora_b``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Linear
      >>> layer = LoRA(3, 2, 4, rngs=Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape
      ((3, 2), (2, 4))
      >>> base = Linear(3, 4, rngs=Rngs(0))
      >>> wrapped = LoRA(3, 2, 4, base_module=base, rngs=Rngs(1))
      >>> x = jnp.ones((16, 3))
      >>> bool(jnp.allclose(wrapped(x), base(x)))  # lora_b starts at zero
      True
    """

    def __init__(
        self,
        in_features: int,
        lora_rank: int,
        out_features: int,
        *,
        base_module: Module | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        a_initializer: Initializer = default_a_initializer,
        b_initializer: Initializer = default_b_initializer,
        lora_param_type: type[Variable] = LoRAParam,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        a_metadata: Mapping[str, Any] = _NO_METADATA,
        b_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        _checks.positive_int(
            "LoRA", "in_features", in_features, "Pass the size of the inputs' last axis."
        )
        _check_rank("LoRA", lora_rank)
        _checks.positive_int(
            "LoRA", "out_features", out_features, "Pass the size of the outputs' last axis."
        )
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.lora_param_type = lora_param_type
        self.base_module = base_module
        self.promote_dtype = promote_dtype
        a_key = rngs.params()
        self.lora_a = lora_param_type(
            a_initializer(a_key, (in_features, lora_rank), param_dtype), **a_metadata
        )
        b_key = rngs.params()
        self.lora_b = lora_param_type(
            b_initializer(b_key, (lora_rank, out_features), param_dtype), **b_metadata
        )

    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        """Returns ``x @ lora_a @ lora_b`` (+ ``base_module(x, **kwargs)``).

        Args:
          x: array of shape ``(..., in_features)``.
          **kwargs: passed on to ``base_module``.
        """
        shape = np.shape(x)
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ValueError(
                f"LoRA expects inputs whose last axis has size in_features={self.in_features}, "
                f"got inputs of shape {shape}."
            )
        x, lora_a, lora_b = self.promote_dtype(
            (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        out = x @ lora_a @ lora_b
        if self.base_module is not None:
            if not callable(self.base_module):
                raise ValueError(
                    f"LoRA: base_module must be callable, got a "
                    f"{type(self.base_module).__name__}; pass a Module with a __call__ method."
                )
            out = out + self.base_module(x, **kwargs)
        return out


class LoRALinear(Linear):
    """A :class:`~refax.nn.Linear` whose output gets a LoRA term: ``linear(x) + lora(x)``.

    The ``kernel`` and ``bias`` are those of a ``Linear`` built with the same arguments (and
    drawn first, so they equal a plain ``Linear``'s for the same seed); the adapter lives in
    the ``lora`` sub-module.

    Args:
      in_features: size of the last axis of the inputs.
      out_features: size of the last axis of the outputs.
      lora_rank: rank of the adapter.
      lora_dtype: computation dtype of the adapter.
      lora_param_dtype: dtype of the adapter matrices.
      a_initializer: initializer of ``lora.lora_a`` (He uniform).
      b_initializer: initializer of ``lora.lora_b`` (zeros).
      lora_param_type: Variable type of the adapter matrices.
      lora_promote_dtype: ``promote_dtype`` of the adapter.
      rngs: random streams (``rngs.params``).
      a_metadata: metadata of ``lora.lora_a``.
      b_metadata: metadata of ``lora.lora_b``.
      **kwargs: the other :class:`~refax.nn.Linear` arguments (``use_bias``, ``dtype``, ...).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax._rngs import Rngs
      >>> from refax.nn import Linear
      >>> linear = Linear(3, 4, rngs=Rngs(0))
      >>> lora_linear = LoRALinear(3, 4, lora_rank=2, rngs=Rngs(0))
      >>> bool(jnp.allclose(linear.kernel[...], lora_linear.kernel[...]))
      True
      >>> lora_linear.lora.lora_a.shape, lora_linear(jnp.ones((16, 3))).shape
      ((3, 2), (16, 4))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora_rank: int,
        lora_dtype: Dtype | None = None,
        lora_param_dtype: Dtype = jnp.float32,
        a_initializer: Initializer = default_a_initializer,
        b_initializer: Initializer = default_b_initializer,
        lora_param_type: type[Variable] = LoRAParam,
        lora_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: Rngs,
        a_metadata: Mapping[str, Any] = _NO_METADATA,
        b_metadata: Mapping[str, Any] = _NO_METADATA,
        **kwargs: Any,
    ):
        _check_rank(type(self).__name__, lora_rank)
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self.lora = LoRA(
            in_features,
            lora_rank,
            out_features,
            dtype=lora_dtype,
            param_dtype=lora_param_dtype,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
            lora_param_type=lora_param_type,
            promote_dtype=lora_promote_dtype,
            rngs=rngs,
            a_metadata=a_metadata,
            b_metadata=b_metadata,
        )

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Returns ``Linear(x) + lora(x)``."""
        y = super().__call__(x, out_sharding=out_sharding)
        return y + self.lora(x)
