"""capture + Module.sow/perturb: oracle parity, perturbation gradients, transforms, cleanup."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._capture import capture
from refax._module import _CAPTURES
from tests._oracle import assert_trees_close, pure

X = jax.random.normal(jax.random.key(0), (2, 3))


def classes(lib):
    class Sub(lib.Module):
        def __init__(self, rngs):
            self.linear = lib.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            y = self.linear(x)
            self.sow(lib.Intermediate, "y", y)
            self.sow(lib.Intermediate, "y", 2 * y)
            self.sow(lib.Intermediate, "total", y.sum(), init_fn=lambda: 0.0, reduce_fn=jnp.add)
            return y

        def encode(self, x):
            return x + 1

    class Model(lib.Module):
        def __init__(self, rngs):
            self.sub = Sub(rngs)
            self.head = lib.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            x = self.perturb("px", x)
            self.sow(lib.Intermediate, "top", x.sum())
            self.sow(lib.Cache, "cached", x)
            return self.head(self.sub(self.sub.encode(x)))

    return Sub, Model


SUB, MODEL = classes(nnx)
F_SUB, F_MODEL = classes(F)


def make(lib):
    return (MODEL if lib is nnx else F_MODEL)(lib.Rngs(0))


def cap(lib):
    return capture if lib is nnx else F.capture


def assert_clean(model):
    for _, m in nnx.iter_modules(model):
        assert _CAPTURES not in vars(m)
        assert not {"y", "total", "top", "cached", "px"} & set(vars(m))


# -- parity with the oracle -----------------------------------------------------------------
@pytest.mark.parametrize(
    "types",
    [
        ("Intermediate",),
        ("Perturbation",),
        ("Cache", "Intermediate"),
        ("Intermediate", "Perturbation"),  # Perturbation is an Intermediate: goes first
        ("Perturbation", "Intermediate"),
    ],
)
def test_captured_states_match_oracle(types):
    ref, mine = make(F), make(nnx)
    out_ref = F.capture(ref, *(getattr(F, t) for t in types))(X)
    out = capture(mine, *(getattr(nnx, t) for t in types))(X)
    assert len(out) == len(out_ref) == 1 + len(types)
    np.testing.assert_allclose(out[0], out_ref[0], rtol=1e-6)
    for s, s_ref in zip(out[1:], out_ref[1:]):
        assert_trees_close(pure(F, s_ref), pure(nnx, s))
        for (path, v), (_, v_ref) in zip(nnx.to_flat_state(s), F.to_flat_state(s_ref)):
            assert type(v).__name__ == type(v_ref).__name__, path
    assert_clean(mine)


def test_capture_layout_and_values():
    model = make(nnx)
    y, inter = capture(model, nnx.Intermediate)(X)
    h = model.sub.linear(X + 1)
    assert set(inter) == {"sub", "top"} and set(inter["sub"]) == {"y", "total"}
    np.testing.assert_allclose(inter["sub"]["y"][0], h, rtol=1e-6)
    np.testing.assert_allclose(inter["sub"]["y"][1], 2 * h, rtol=1e-6)
    np.testing.assert_allclose(inter["sub"]["total"][...], h.sum(), rtol=1e-6)
    assert isinstance(inter["top"], nnx.Intermediate)


def test_no_types_returns_output_only():
    out, out_ref = capture(make(nnx))(X), F.capture(make(F))(X)
    assert isinstance(out, jax.Array) and isinstance(out_ref, jax.Array)


def test_function_decorator_and_bound_method_forms():
    model = make(nnx)

    @capture(nnx.Intermediate)
    def forward(m, x):
        return m(x)

    y, inter = forward(model, X)
    y2, inter2 = capture(lambda m, x: m(x), nnx.Intermediate)(model, X)
    np.testing.assert_allclose(y, y2)
    assert_trees_close(pure(nnx, inter), pure(nnx, inter2))
    assert forward.__name__ == "forward"
    # a bound method: values are recorded on its Module's tree
    _, inter = capture(model.sub.__call__, nnx.Intermediate)(X)
    _, inter_ref = F.capture(make(F).sub.__call__, F.Intermediate)(X)
    assert_trees_close(pure(F, inter_ref), pure(nnx, inter))
    assert_clean(model)


def test_sow_of_uncaptured_type_is_a_noop():
    model = make(nnx)
    results = []

    def fn(m, x):
        results.append(m.sow(nnx.BatchStat, "nope", x))
        results.append(m.sow(nnx.Intermediate, "yes", x))
        return m.perturb("p", x)

    out, inter = capture(fn, nnx.Intermediate)(model, X)
    assert results == [False, True] and set(inter) == {"yes"}
    np.testing.assert_array_equal(out, X)  # Perturbation not captured: value unchanged
    assert_clean(model)


def test_method_outputs_match_oracle_and_classes_are_restored():
    originals = dict(vars(SUB)), dict(vars(MODEL))
    _, inter = capture(make(nnx), nnx.Intermediate, method_outputs=nnx.Intermediate)(X)
    _, ref = F.capture(make(F), F.Intermediate, method_outputs=F.Intermediate)(X)
    assert_trees_close(pure(F, ref), pure(nnx, inter))
    assert set(inter["sub"]) == {"__call__", "encode", "y", "total", "linear"}
    assert (dict(vars(SUB)), dict(vars(MODEL))) == originals
    # only Modules being captured record method outputs
    other = make(nnx)
    other(X)
    assert "__call__" not in vars(other)


def test_method_outputs_of_a_bound_method():
    model = make(nnx)
    out, inter = capture(model.sub.encode, nnx.Intermediate, method_outputs=nnx.Intermediate)(X)
    np.testing.assert_allclose(inter["encode"][0], X + 1)  # (the oracle records nothing here)


# -- perturbations and gradients ----------------------------------------------------------------
def test_perturbation_gradients():
    model = make(nnx)
    _, perturbations = capture(model, nnx.Perturbation)(X)
    np.testing.assert_array_equal(perturbations["px"][...], jnp.zeros_like(X))

    def loss(m, p, x):
        y, inter = capture(m, nnx.Intermediate, init=p)(x)
        return y.sum(), inter

    argnums = (0, nnx.DiffState(1, nnx.Perturbation))
    (grads, p_grads), inter = nnx.grad(loss, argnums=argnums, has_aux=True)(model, perturbations, X)
    # d loss / d intermediate x, written out with the model's (sow-free) Linear layers
    expected = jax.grad(lambda x: model.head(model.sub.linear(x + 1)).sum())(X)
    np.testing.assert_allclose(p_grads["px"][...], expected, rtol=1e-5)
    assert "top" in inter and "px" not in inter
    # the oracle's gradient of the intermediate
    fm = make(F)
    _, fp = F.capture(fm, F.Perturbation)(X)

    def floss(m, p, x):
        y, inter = F.capture(m, F.Intermediate, init=p)(x)
        return y.sum(), inter

    (_, fp_grads), _ = F.grad(floss, argnums=(0, 1), has_aux=True)(fm, fp, X)
    np.testing.assert_allclose(p_grads["px"][...], fp_grads["px"][...], rtol=1e-5)
    assert_clean(model)


def test_perturbation_gradients_with_plain_argnums():
    model = make(nnx)
    _, perturbations = capture(model, nnx.Perturbation)(X)

    def loss(m, p, x):
        return capture(m, nnx.Intermediate, init=p)(x)[0].sum()

    p_grads = nnx.grad(loss, argnums=1)(model, perturbations, X)
    assert isinstance(p_grads["px"], nnx.Perturbation)


def test_perturb_outside_capture_keeps_a_variable():
    model = make(nnx)
    model(X)
    assert isinstance(model.px, nnx.Perturbation) and isinstance(model.sub.y, nnx.Intermediate)
    np.testing.assert_array_equal(model.px[...], 0.0)
    model.px[...] = jnp.ones_like(X)
    np.testing.assert_array_equal(model.perturb("px", X), X + 1)


# -- transforms, nesting, cleanup --------------------------------------------------------------
def test_capture_inside_and_around_jit():
    model = make(nnx)
    y, inter = capture(model, nnx.Intermediate)(X)

    @nnx.jit
    def inside(m, x):
        return capture(m, nnx.Intermediate)(x)

    y_in, inter_in = inside(model, X)
    around = capture(nnx.jit(lambda m, x: m(x)), nnx.Intermediate)
    y_around, inter_around = around(model, X)
    for out, state in ((y_in, inter_in), (y_around, inter_around)):
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)
        assert_trees_close(pure(nnx, inter), pure(nnx, state), rtol=1e-5, atol=1e-6)
    assert_clean(model)


def test_nested_captures():
    model = make(nnx)

    def outer_fn(m, x):
        _, inner = capture(m.sub, nnx.Intermediate)(x)
        return m(x), inner

    (y, inner), outer = capture(outer_fn, nnx.Intermediate)(model, X)
    assert set(inner) == {"y", "total"}
    assert set(outer) == {"sub", "top"} and len(outer["sub"]["y"][...]) == 2
    assert_clean(model)


def test_cleanup_after_exception():
    model = make(nnx)

    def boom(m, x):
        m(x)
        raise RuntimeError("boom")

    originals = dict(vars(SUB))
    with pytest.raises(RuntimeError, match="boom"):
        capture(boom, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, X)
    assert_clean(model)
    assert dict(vars(SUB)) == originals


def test_errors():
    with pytest.raises(TypeError, match="Variable subclasses"):
        capture(make(nnx), "Intermediate")
    with pytest.raises(TypeError, match="first argument must be the model"):
        capture(lambda: 1, nnx.Intermediate)()
