"""refax.config.explain_retraces: each retrace of an nnx.jit function logs what changed."""

import logging

import jax.numpy as jnp
import pytest

import refax
from refax import nnx


class Model(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.mode = "train"


@pytest.fixture
def explain():
    refax.config.update("explain_retraces", True)
    yield
    refax.config.explain_retraces = False


def run(caplog, f, *args):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refax"):
        f(*args)
    return [r.getMessage() for r in caplog.records if r.name == "refax"]


def test_each_kind_of_change_is_named_by_path(explain, caplog):
    @nnx.jit
    def step(model, x):
        return model.linear(x)

    m, x = Model(), jnp.ones((1, 2))
    assert run(caplog, step, m, x) == []  # first trace: nothing to compare with
    assert run(caplog, step, m, x) == []  # cached: no trace, no log
    m.mode = "eval"
    (msg,) = run(caplog, step, m, x)
    assert "retraced test_each_kind_of_change_is_named_by_path.<locals>.step at" in msg
    assert "model.mode: static value 'train' -> 'eval'" in msg
    (msg,) = run(caplog, step, m, jnp.ones((4, 2)))
    assert "x: float32[1,2] -> float32[4,2]" in msg
    m.extra = nnx.BatchStat(jnp.zeros(3))
    (msg,) = run(caplog, step, m, jnp.ones((4, 2)))
    assert "model.extra: added (BatchStat float32[3])" in msg
    del m.extra  # back to a structure JAX has a trace for: no retrace, no log
    assert run(caplog, step, m, jnp.ones((4, 2))) == []
    m.extra = nnx.BatchStat(jnp.zeros(3))
    m.other = nnx.BatchStat(jnp.zeros(1))
    run(caplog, step, m, jnp.ones((4, 2)))
    del m.other, m.extra
    m.third = nnx.BatchStat(jnp.zeros(2))
    (msg,) = run(caplog, step, m, jnp.ones((4, 2)))
    assert "model.extra: removed (was BatchStat float32[3])" in msg
    assert "model.third: added (BatchStat float32[2])" in msg
    m.linear.kernel = nnx.Param(jnp.ones((2, 3), jnp.bfloat16))
    (msg,) = run(caplog, step, m, jnp.ones((4, 2)))
    assert "model.linear.kernel: Param float32[2,3] -> Param bfloat16[2,3]" in msg
    m.alias = m.linear.bias
    (msg,) = run(caplog, step, m, jnp.ones((4, 2)))
    assert "sharing: model.alias and model.linear.bias are now the same object" in msg


def test_static_arguments_and_off_by_default(caplog):
    @nnx.jit(static_argnums=1)
    def scale(x, factor):
        return x * factor

    assert run(caplog, scale, jnp.ones(2), 2) == [] and run(caplog, scale, jnp.ones(2), 3) == []
    refax.config.explain_retraces = True
    try:
        run(caplog, scale, jnp.ones(2), 4)
        (msg,) = run(caplog, scale, jnp.ones(2), 5)
        assert "factor: static value 4 -> 5" in msg
    finally:
        refax.config.explain_retraces = False


def test_config_rejects_unknown_options():
    with pytest.raises(AttributeError, match="explain_retraces"):
        refax.config.update("explain_everything", True)
