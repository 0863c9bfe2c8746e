"""Tests for nnx.tabulate (refax/training/summary.py)."""

import sys

import flax.nnx as fnnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx
from tests._oracle import pure

PLAIN = dict(force_terminal=False, no_color=True, width=10_000)


def _block_model(lib):
    class Block(lib.Module):
        def __init__(self, din, dout, rngs):
            self.linear = lib.Linear(din, dout, rngs=rngs)
            self.bn = lib.BatchNorm(dout, rngs=rngs)
            self.dropout = lib.Dropout(0.2, rngs=rngs)

        def forward(self, x):
            return lib.relu(self.dropout(self.bn(self.linear(x))))

    class Foo(lib.Module):
        def __init__(self, rngs):
            self.block1 = Block(32, 128, rngs=rngs)
            self.block2 = Block(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.block2.forward(self.block1.forward(x))

    return Foo(lib.Rngs(0))


def _two_outputs(lib):
    class MLP(lib.Module):
        def __init__(self):
            self.weight = lib.Param(jnp.ones((4, 8)))
            self.bias = lib.Param(jnp.ones(8))

        def __call__(self, x, x2):
            y = x @ self.weight + self.bias[None] + x2
            return x, y, 2 * y

    return MLP()


@pytest.mark.parametrize(
    "build,inputs",
    [(_block_model, (jnp.ones((1, 32)),)), (_two_outputs, (jnp.ones((1, 4)), jnp.ones((1, 8))))],
)
def test_table_matches_oracle_text(build, inputs):
    ours = nnx.tabulate(build(nnx), *inputs, console_kwargs=PLAIN)
    ref = fnnx.tabulate(build(fnnx), *inputs, console_kwargs=PLAIN)
    assert ours == ref


def test_rows_counts_and_totals():
    text = nnx.tabulate(_block_model(nnx), jnp.ones((1, 32)), console_kwargs=PLAIN)
    lines = text.splitlines()
    assert "Foo Summary" in lines[0]
    paths = [
        ln.split("│")[1].strip() for ln in lines if ln.startswith("│") and ln.split("│")[1].strip()
    ]
    assert paths == [
        "block1/forward",
        "block1/linear",
        "block1/bn",
        "block1/dropout",
        "block2/forward",
        "block2/linear",
        "block2/bn",
        "block2/dropout",
    ]
    # 32*128+128 + 128*10+10 params, plus 2 BatchNorm scale/bias pairs
    n_params = 32 * 128 + 128 + 128 * 10 + 10 + 2 * (128 + 10)
    assert f"{n_params:,} ({n_params * 4 / 1000:.1f} KB)" in text
    assert "Total Parameters: 6,070 (24.3 KB)" in lines[-1]


def test_never_compiles_and_leaves_model_unchanged(monkeypatch):
    model = _block_model(nnx)
    before = pure(nnx, model)

    def no_compile(*args, **kwargs):
        raise AssertionError("tabulate compiled something")

    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    text = nnx.tabulate(
        model, jnp.ones((1, 32)), compute_flops=True, compute_vjp_flops=True, console_kwargs=PLAIN
    )
    assert "flops" in text and "vjp_flops" in text
    after = pure(nnx, model)
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_flops_of_a_matmul():
    class Dense(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((16, 8)))

        def __call__(self, x):
            return x @ self.w

    text = nnx.tabulate(Dense(), jnp.ones((4, 16)), compute_flops=True, console_kwargs=PLAIN)
    row = [ln for ln in text.splitlines() if "Dense" in ln and "Summary" not in ln][0]
    flops = int(row.split("│")[5].strip().replace(",", ""))
    assert flops == 2 * 4 * 16 * 8


def test_abstract_inputs_depth_and_shared_modules():
    class Model(nnx.Module):
        def __init__(self, rngs):
            shared = nnx.Linear(2, 2, rngs=rngs)
            self.a = nnx.Sequential(shared)
            self.b = nnx.Sequential(shared)

        def __call__(self, x):
            return self.b(self.a(x))

    x = jax.ShapeDtypeStruct((3, 2), jnp.float32)
    text = nnx.tabulate(Model(nnx.Rngs(0)), x, console_kwargs=PLAIN)
    assert text.count("│ Linear") == 1  # the shared layer is listed once
    shallow = nnx.tabulate(Model(nnx.Rngs(0)), x, depth=1, console_kwargs=PLAIN)
    assert "Linear" not in shallow and "Sequential" in shallow


def test_kwargs_and_static_inputs_are_shown():
    class Model(nnx.Module):
        def sub(self, x, *, foo=None):
            return x

        def __call__(self, x, n):
            self.sub(x, foo={})
            return self.sub(x, foo=n)

    text = nnx.tabulate(Model(), jnp.zeros((1, 8)), 3, console_kwargs=PLAIN)
    assert "foo: {}" in text and "foo: 3" in text and "- 3" in text


def test_plain_text_without_rich(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    text = nnx.tabulate(_two_outputs(nnx), jnp.ones((1, 4)), jnp.ones((1, 8)))
    assert "MLP Summary" in text and "weight: float32[4,8]" in text
    assert "Total Parameters: 40 (160 B)" in text
    assert "\x1b[" not in text


def test_filter_rng_streams_and_callinfo():
    from refax.nnx import summary

    row = summary.CallInfo(("rngs",), nnx.Rngs, "__call__", ((), {}), None, {}, {})
    assert not summary.filter_rng_streams(row)
    assert summary.tabulate is nnx.tabulate
