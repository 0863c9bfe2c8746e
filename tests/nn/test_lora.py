"""LoRA, LoRALinear and LoRAParam: oracle parity, reference math, gradients, errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import Linear, initializers
from refax.nn.lora import LoRA, LoRALinear, LoRAParam

X = jax.random.normal(jax.random.key(1), (4, 3))
B_INIT = initializers.normal(0.5)  # non-zero lora_b so the adapter term shows


def f32(x):
    return np.asarray(x, np.float32)


def flat(lib, module):
    return {
        tuple(map(str, p)): (type(v).__name__, f32(v.get_value()))
        for p, v in lib.to_flat_state(lib.state(module))
    }


def assert_same_state(ref, mine):
    a, b = flat(F, ref), flat(nnx, mine)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == b[key][0], key
        np.testing.assert_allclose(a[key][1], b[key][1], rtol=1e-6, err_msg=str(key))


def assert_close(ref, mine, rtol=1e-5):
    assert ref.shape == mine.shape and ref.dtype == mine.dtype
    np.testing.assert_allclose(f32(ref), f32(mine), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("cls", ["LoRA", "LoRALinear"])
def test_signature_matches_oracle(cls):
    ref = inspect.signature(getattr(F, cls).__init__).parameters
    mine = inspect.signature({"LoRA": LoRA, "LoRALinear": LoRALinear}[cls].__init__).parameters
    assert list(ref) == list(mine)
    assert [p.kind for p in ref.values()] == [p.kind for p in mine.values()]


def test_lora_param_is_a_param():
    assert issubclass(LoRAParam, nnx.Param)
    layer = LoRA(3, 2, 4, rngs=Rngs(0))
    assert type(layer.lora_a) is LoRAParam and type(layer.lora_b) is LoRAParam
    assert set(nnx.state(layer, nnx.Param)) == {"lora_a", "lora_b"}


@pytest.mark.parametrize("dtype,param_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32)])
def test_lora_matches_oracle(dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, b_initializer=B_INIT)
    ref = F.LoRA(3, 2, 4, **kw, rngs=F.Rngs(0))
    mine = LoRA(3, 2, 4, **kw, rngs=Rngs(0))
    assert mine.lora_a.shape == (3, 2) and mine.lora_b.shape == (2, 4)
    assert_same_state(ref, mine)
    assert_close(ref(X), mine(X), rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5)


def test_lora_default_init_matches_oracle_and_starts_at_zero():
    ref, mine = F.LoRA(5, 3, 2, rngs=F.Rngs(params=4)), LoRA(5, 3, 2, rngs=Rngs(params=4))
    assert_same_state(ref, mine)
    np.testing.assert_array_equal(mine.lora_b[...], 0)
    bound = np.sqrt(6 / 5)  # he_uniform with fan_in = in_features
    assert np.abs(f32(mine.lora_a[...])).max() <= bound


def test_lora_with_base_module_matches_oracle():
    ref_base, base = F.Linear(3, 4, rngs=F.Rngs(0)), Linear(3, 4, rngs=Rngs(0))
    ref = F.LoRA(3, 2, 4, base_module=ref_base, b_initializer=B_INIT, rngs=F.Rngs(1))
    mine = LoRA(3, 2, 4, base_module=base, b_initializer=B_INIT, rngs=Rngs(1))
    assert mine.base_module is base
    assert_same_state(ref, mine)
    assert_close(ref(X), mine(X))
    a, b = mine.lora_a[...], mine.lora_b[...]
    np.testing.assert_allclose(mine(X), X @ a @ b + base(X), rtol=1e-5)


def test_lora_passes_kwargs_to_base_module():
    class Scaled(nnx.Module):
        def __call__(self, x, *, scale=1.0):
            return x[..., :1] * scale

    layer = LoRA(3, 2, 1, base_module=Scaled(), rngs=Rngs(0))
    np.testing.assert_allclose(layer(X, scale=3.0), 3.0 * X[:, :1])


@pytest.mark.parametrize("use_bias", [True, False])
def test_lora_linear_matches_oracle(use_bias):
    kw = dict(lora_rank=2, use_bias=use_bias, b_initializer=B_INIT)
    ref = F.LoRALinear(3, 4, **kw, bias_init=F.initializers.normal(0.1), rngs=F.Rngs(0))
    mine = LoRALinear(3, 4, **kw, bias_init=initializers.normal(0.1), rngs=Rngs(0))
    assert isinstance(mine, Linear)
    assert_same_state(ref, mine)
    assert_close(ref(X), mine(X))
    linear = Linear(3, 4, use_bias=use_bias, bias_init=initializers.normal(0.1), rngs=Rngs(0))
    np.testing.assert_array_equal(linear.kernel[...], mine.kernel[...])
    lora_term = X @ mine.lora.lora_a[...] @ mine.lora.lora_b[...]
    np.testing.assert_allclose(mine(X), linear(X) + lora_term, rtol=1e-5, atol=1e-6)


def test_lora_linear_dtypes_match_oracle():
    kw = dict(lora_rank=2, lora_param_dtype=jnp.bfloat16, b_initializer=B_INIT)
    ref = F.LoRALinear(3, 4, **kw, dtype=jnp.bfloat16, rngs=F.Rngs(0))
    mine = LoRALinear(3, 4, **kw, dtype=jnp.bfloat16, rngs=Rngs(0))
    assert mine.lora.lora_a.dtype == jnp.bfloat16 and mine.kernel.dtype == jnp.float32
    assert_same_state(ref, mine)
    assert_close(ref(X), mine(X), rtol=1e-2)


def test_custom_param_type_and_metadata():
    class Adapter(nnx.Param):
        pass

    layer = LoRALinear(
        3, 4, lora_rank=2, lora_param_type=Adapter, a_metadata={"tag": "a"}, rngs=Rngs(0)
    )
    assert type(layer.lora.lora_a) is Adapter
    assert layer.lora.lora_a.get_metadata()["tag"] == "a"
    assert set(nnx.state(layer, Adapter)["lora"]) == {"lora_a", "lora_b"}


def test_lora_linear_gradients():
    layer = LoRALinear(3, 4, lora_rank=2, b_initializer=B_INIT, rngs=Rngs(0))
    graphdef, lora_params, rest = nnx.split(layer, LoRAParam, ...)

    def loss(lora_params, x):
        return (nnx.merge(graphdef, lora_params, rest, copy=True)(x) ** 2).sum()

    grads = jax.jit(jax.grad(loss))(lora_params, X)
    a, b = layer.lora.lora_a[...], layer.lora.lora_b[...]
    y = layer(X)
    # d/dA sum(y^2) = x^T (2y) b^T, d/dB = (x a)^T (2y)
    np.testing.assert_allclose(grads["lora"]["lora_a"][...], X.T @ (2 * y) @ b.T, rtol=1e-4)
    np.testing.assert_allclose(grads["lora"]["lora_b"][...], (X @ a).T @ (2 * y), rtol=1e-4)
    assert set(grads) == {"lora"}  # only the adapter was differentiated


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"LoRA expects inputs .*in_features=3.*\(4, 5\)"):
        LoRA(3, 2, 4, rngs=Rngs(0))(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"Linear expects inputs .*in_features=3.*\(4, 5\)"):
        LoRALinear(3, 4, lora_rank=2, rngs=Rngs(0))(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="base_module must be callable"):
        LoRA(3, 2, 4, base_module=nnx.Module(), rngs=Rngs(0))(X)
