"""A transformed function keeps no per-call state on its wrapper: threads calling it under
different ``set_graph_updates`` contexts each get their own behaviour."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest

from refax import nnx
from refax._transforms import _jit, _vmap


def _run_in_lockstep(monkeypatch, module, call):
    """Runs ``call(updates)`` in two threads (graph updates on / off), stopping both right
    after they resolved their modes, so each one's preparation overlaps the other's call."""
    barrier = threading.Barrier(2, timeout=30)
    original = module.split_inputs

    def split_inputs(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "split_inputs", split_inputs)
    results, errors = {}, []

    def worker(updates: bool):
        try:
            with nnx.set_graph_updates(updates):
                results[updates] = call(updates)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(u,)) for u in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


class Box(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones(2))


@pytest.mark.parametrize("round_", range(3))
def test_jit_modes_are_per_call(monkeypatch, round_):
    @nnx.jit
    def grow(box):
        box.extra = nnx.Param(jnp.zeros(2))  # a structural change: propagates only with updates
        box.w[...] = box.w[...] + 1  # a value change: always propagates

    def call(updates):
        box = Box()
        grow(box)
        return box

    boxes = _run_in_lockstep(monkeypatch, _jit, call)
    assert not hasattr(boxes[False], "extra") and hasattr(boxes[True], "extra")
    for box in boxes.values():
        assert float(box.w[0]) == 2.0


def test_vmap_modes_are_per_call(monkeypatch):
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def grow(box):
        box.extra = nnx.Param(jnp.zeros(()))
        box.w[...] = box.w[...] * 3

    def call(updates):
        box = Box()
        grow(box)
        return box

    boxes = _run_in_lockstep(monkeypatch, _vmap, call)
    assert not hasattr(boxes[False], "extra") and hasattr(boxes[True], "extra")
    for box in boxes.values():
        assert float(box.w[0]) == 3.0
