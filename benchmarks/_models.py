"""The benchmark model, written once against the NNX API and instantiated per library.

``make_model_classes(nnx)`` returns ``(Linear, LayerNorm, Block, Model)`` built on
``nnx.Module`` / ``nnx.Param`` of the given library module (``refax`` or ``flax.nnx``), so a
comparison measures the framework and never two different layer implementations. The layers
carry the same kind of static attributes real layers have (features, dtypes, precision,
initializers, epsilon, reduction axes, ...), since those take part in every graph walk.

Library differences handled here: flax 0.12 requires a list of Modules stored on a Module to be
wrapped in ``nnx.List``; refax takes a plain Python list.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

default_kernel_init = jax.nn.initializers.lecun_normal()


def zeros_init(key: Any, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros(shape, dtype)


def ones_init(key: Any, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.ones(shape, dtype)


def is_flax(nnx: ModuleType) -> bool:
    return nnx.__name__.startswith("flax")


def make_model_classes(nnx: ModuleType) -> tuple[type, type, type, type]:
    """``(Linear, LayerNorm, Block, Model)`` for the library module ``nnx``."""
    wrap_list = nnx.List if is_flax(nnx) else list

    class Linear(nnx.Module):
        def __init__(
            self,
            in_features: int,
            out_features: int,
            *,
            use_bias: bool = True,
            dtype: Any = None,
            param_dtype: Any = jnp.float32,
            precision: Any = None,
            kernel_init: Any = default_kernel_init,
            bias_init: Any = zeros_init,
            key: Any,
        ):
            self.in_features = in_features
            self.out_features = out_features
            self.use_bias = use_bias
            self.dtype = dtype
            self.param_dtype = param_dtype
            self.precision = precision
            self.kernel_init = kernel_init
            self.bias_init = bias_init
            self.kernel = nnx.Param(kernel_init(key, (in_features, out_features), param_dtype))
            self.bias = (
                nnx.Param(bias_init(key, (out_features,), param_dtype)) if use_bias else None
            )

        def __call__(self, x: jax.Array) -> jax.Array:
            y = jnp.dot(x, self.kernel[...], precision=self.precision)
            if self.bias is not None:
                y = y + self.bias[...]
            return y if self.dtype is None else y.astype(self.dtype)

    class LayerNorm(nnx.Module):
        def __init__(
            self,
            num_features: int,
            *,
            epsilon: float = 1e-6,
            dtype: Any = None,
            param_dtype: Any = jnp.float32,
            use_bias: bool = True,
            use_scale: bool = True,
            bias_init: Any = zeros_init,
            scale_init: Any = ones_init,
            reduction_axes: int | tuple[int, ...] = -1,
            feature_axes: int | tuple[int, ...] = -1,
            key: Any,
        ):
            self.num_features = num_features
            self.epsilon = epsilon
            self.dtype = dtype
            self.param_dtype = param_dtype
            self.use_bias = use_bias
            self.use_scale = use_scale
            self.bias_init = bias_init
            self.scale_init = scale_init
            self.reduction_axes = reduction_axes
            self.feature_axes = feature_axes
            shape = (num_features,)
            self.scale = nnx.Param(scale_init(key, shape, param_dtype)) if use_scale else None
            self.bias = nnx.Param(bias_init(key, shape, param_dtype)) if use_bias else None

        def __call__(self, x: jax.Array) -> jax.Array:
            mean = x.mean(axis=self.reduction_axes, keepdims=True)
            var = x.var(axis=self.reduction_axes, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
            if self.scale is not None:
                y = y * self.scale[...]
            if self.bias is not None:
                y = y + self.bias[...]
            return y if self.dtype is None else y.astype(self.dtype)

    class Block(nnx.Module):
        def __init__(self, width: int, *, key: Any, inits: dict | None = None):
            inits = inits or {}
            linear_inits = {k: v for k, v in inits.items() if k in ("kernel_init", "bias_init")}
            norm_inits = {k: v for k, v in inits.items() if k in ("scale_init", "bias_init")}
            self.linear = Linear(width, width, key=key, **linear_inits)
            self.norm = LayerNorm(width, key=key, **norm_inits)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.norm(self.linear(x))

    class Model(nnx.Module):
        """``num_blocks`` x (Linear + LayerNorm): 4 Params per block.

        ``inits`` overrides initializers (``kernel_init``, ``bias_init``, ``scale_init``) of
        every layer; ``key`` may then be None when none of them uses it.
        """

        def __init__(
            self, num_blocks: int, width: int, *, key: Any = None, inits: dict | None = None
        ):
            self.num_blocks = num_blocks
            self.width = width
            keys = [None] * num_blocks if key is None else jax.random.split(key, num_blocks)
            self.blocks = wrap_list([Block(width, key=k, inits=inits) for k in keys])

        def __call__(self, x: jax.Array) -> jax.Array:
            for block in self.blocks:
                x = block(x)
            return x

    return Linear, LayerNorm, Block, Model


class PresetInit:
    """An initializer returning one preallocated array per (shape, dtype): construction timed
    with it measures the framework (Module/Variable creation), not array creation."""

    def __init__(self, fill: float = 0.0):
        self.fill = fill
        self._arrays: dict = {}

    def __call__(self, key: Any, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
        k = (tuple(shape), jnp.dtype(dtype))
        a = self._arrays.get(k)
        if a is None:
            a = self._arrays[k] = jnp.full(shape, self.fill, dtype)
        return a


def preset_inits() -> dict:
    """``inits`` for ``Model`` that create no arrays (see ``PresetInit``)."""
    zeros, ones = PresetInit(0.0), PresetInit(1.0)
    return {"kernel_init": zeros, "bias_init": zeros, "scale_init": ones}


def pure_dict(model: Any) -> dict:
    """The model's arrays as a plain nested dict (the ``jax.tree`` baseline)."""
    out: dict = {}
    for i, block in enumerate(model.blocks):
        lin, norm = block.linear, block.norm
        out[i] = {
            "linear": {"kernel": lin.kernel[...], "bias": lin.bias[...]},
            "norm": {"scale": norm.scale[...], "bias": norm.bias[...]},
        }
    return {"blocks": out}
