"""Tests for refax.training.checkpoint (orbax) and refax.torch_weights (safetensors)."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from refax import nnx
from refax.training import checkpoint
from refax.training.checkpoint import CheckpointMismatchError
from tests._oracle import pure


class Net(nnx.Module):
    def __init__(self, rngs, din=3, dout=4):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(dout, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[0](self.dropout(self.bn(self.linear(x))))


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, pure(nnx, a), pure(nnx, b))


def test_round_trip_concrete_model_with_rng_keys(tmp_path):
    model = Net(nnx.Rngs(0))
    model(jnp.ones((2, 3)))  # moves the dropout RNG counter and batch stats
    path = checkpoint.save(tmp_path / "ckpt", model)
    fresh = Net(nnx.Rngs(1))
    assert checkpoint.restore(path, fresh) is fresh
    _assert_same(model, fresh)
    key = fresh.dropout.rngs.key[...]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(fresh(jnp.ones((2, 3))), model(jnp.ones((2, 3))))


def test_restore_into_abstract_model(tmp_path):
    model = Net(nnx.Rngs(0))
    path = checkpoint.save(tmp_path / "ckpt", model)
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(7)))
    assert isinstance(abstract.linear.kernel[...], jax.ShapeDtypeStruct)
    restored = checkpoint.restore(path, abstract)
    _assert_same(model, restored)


def test_optimizer_state_and_step_round_trip(tmp_path):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(3):
        grads = nnx.grad(lambda m: m(jnp.ones((2, 3))).sum())(model)
        opt.update(model, grads)
    checkpoint.save(tmp_path / "opt", opt)
    fresh = nnx.Optimizer(Net(nnx.Rngs(1)), optax.adam(1e-2), wrt=nnx.Param)
    checkpoint.restore(tmp_path / "opt", fresh)
    assert int(fresh.step[...]) == 3
    _assert_same(opt, fresh)


def test_sharded_restore_on_mesh(tmp_path):
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("a", "b"))

    def make(seed):
        return nnx.Linear(4, 8, kernel_init=init, use_bias=False, rngs=nnx.Rngs(seed))

    with jax.set_mesh(mesh):
        model = make(0)
        checkpoint.save(tmp_path / "sharded", model)
        abstract = nnx.eval_shape(lambda: make(1))
        restored = checkpoint.restore(tmp_path / "sharded", abstract)
    kernel = restored.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("a", "b")
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_array_equal(kernel, model.kernel[...])
    # the mesh may also be given explicitly
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: make(2))
    restored = checkpoint.restore(tmp_path / "sharded", abstract, mesh=mesh)
    assert restored.kernel[...].sharding.spec == jax.sharding.PartitionSpec("a", "b")


def test_pure_dict_forms(tmp_path):
    model = Net(nnx.Rngs(0))
    checkpoint.save(tmp_path / "pd", nnx.to_pure_dict(nnx.state(model)))
    fresh = Net(nnx.Rngs(3))
    checkpoint.restore(tmp_path / "pd", fresh)
    _assert_same(model, fresh)
    loaded = checkpoint.load_pure_dict(tmp_path / "pd")
    assert 0 in loaded["layers"]  # integer keys come back as ints
    other = Net(nnx.Rngs(4))
    state = nnx.state(other, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    restored = checkpoint.restore(tmp_path / "pd", nnx.to_pure_dict(nnx.state(other)))
    np.testing.assert_array_equal(restored["linear"]["kernel"], params["linear"]["kernel"])
    nnx.replace_by_pure_dict(state, {k: loaded[k] for k in ("linear",)} | {})
    np.testing.assert_array_equal(state["linear"]["kernel"][...], params["linear"]["kernel"])
    # a State target is filled in place
    target = nnx.state(Net(nnx.Rngs(5)))
    assert checkpoint.restore(tmp_path / "pd", target) is target
    np.testing.assert_array_equal(target["bn"]["mean"][...], model.bn.mean[...])


def test_mismatch_lists_paths_and_changes_nothing(tmp_path):
    checkpoint.save(tmp_path / "small", Net(nnx.Rngs(0), din=3))
    target = Net(nnx.Rngs(1), din=5)
    target.extra = nnx.Param(jnp.zeros(2))
    del target.bn
    before = pure(nnx, target)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoint.restore(tmp_path / "small", target)
    err = info.value
    assert "extra" in err.missing
    assert {"bn/mean", "bn/var", "bn/scale", "bn/bias"} <= set(err.unexpected)
    assert [m[0] for m in err.mismatched] == ["linear/kernel"]
    assert err.mismatched[0][1:] == ((3, 4), (5, 4))
    assert "linear/kernel" in str(err) and isinstance(err, ValueError)
    jax.tree.map(np.testing.assert_array_equal, before, pure(nnx, target))


def test_save_refuses_to_clobber_and_overwrites(tmp_path):
    a, b = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
    checkpoint.save(tmp_path / "c", a)
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path / "c", b)
    checkpoint.save(tmp_path / "c", b, overwrite=True)
    fresh = Net(nnx.Rngs(2))
    checkpoint.restore(tmp_path / "c", fresh)
    _assert_same(b, fresh)
    assert sorted(os.listdir(tmp_path)) == ["c"]
    with pytest.raises(ValueError, match="abstract"):
        checkpoint.save(tmp_path / "d", nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    assert checkpoint.metadata(tmp_path / "c")["linear/kernel"][0] == (3, 4)


def test_loading_unpickles_nothing(tmp_path, monkeypatch):
    model = Net(nnx.Rngs(0))
    checkpoint.save(tmp_path / "c", model)

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading used pickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    checkpoint.restore(tmp_path / "c", Net(nnx.Rngs(1)))
    checkpoint.load_pure_dict(tmp_path / "c")


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from refax.training import checkpoint
    path = sys.argv[1]
    checkpoint.save(path, {"w": jnp.zeros((4,)), "big": jnp.zeros((64, 1024, 1024))})
    print("saved-first", flush=True)
    checkpoint.save(path, {"w": jnp.ones((4,)), "big": jnp.ones((64, 1024, 1024))}, overwrite=True)
    print("saved-second", flush=True)
    """
)


def test_killed_save_keeps_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, path],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert proc.stdout.readline().strip() == "saved-first"
        # kill the second (overwriting) save without warning once it has started writing
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if set(os.listdir(tmp_path)) - {"ckpt"}:
                break
            time.sleep(0.002)
        writing = bool(set(os.listdir(tmp_path)) - {"ckpt"})
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    target["big"] = jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32)
    restored = checkpoint.restore(path, target)
    w = np.asarray(restored["w"])
    if writing:  # killed mid-save: the previous checkpoint is the one that restores
        assert (w == 0).all()
    # the previous checkpoint, intact (or, had the save won the race, the complete new one)
    assert (w == 0).all() or (w == 1).all()
    assert float(restored["big"][0, 0, 0]) == float(w[0])
    assert float(restored["big"][-1, -1, -1]) == float(w[0])


# -- PyTorch weights ---------------------------------------------------------------------------


class TorchLike(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 4, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])


def test_load_torch_safetensors_layouts(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    sd = {
        "conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(8,)).astype(np.float32),
        "bn.weight": rng.normal(size=(8,)).astype(np.float32),
        "bn.bias": rng.normal(size=(8,)).astype(np.float32),
        "bn.running_mean": rng.normal(size=(8,)).astype(np.float32),
        "bn.running_var": rng.uniform(size=(8,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "fc.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "fc.bias": rng.normal(size=(4,)).astype(np.float32),
        "blocks.0.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "blocks.0.bias": rng.normal(size=(4,)).astype(np.float32),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path)
    from refax.torch_weights import load_torch_weights

    model = TorchLike(nnx.Rngs(0))
    report = load_torch_weights(model, path)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.mismatched_keys == []
    np.testing.assert_array_equal(model.conv.kernel[...], sd["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.fc.kernel[...], sd["fc.weight"].T)
    np.testing.assert_array_equal(model.blocks[0].kernel[...], sd["blocks.0.weight"].T)
    np.testing.assert_array_equal(model.bn.scale[...], sd["bn.weight"])
    np.testing.assert_array_equal(model.bn.mean[...], sd["bn.running_mean"])
    np.testing.assert_array_equal(model.bn.var[...], sd["bn.running_var"])
    # y = x W^T + b, as torch computes it
    x = rng.normal(size=(2, 8)).astype(np.float32)
    np.testing.assert_allclose(model.fc(x), x @ sd["fc.weight"].T + sd["fc.bias"], rtol=1e-5)


def test_load_torch_report_and_mapping():
    from refax.torch_weights import LoadReport, load_torch_weights

    model = TorchLike(nnx.Rngs(0))
    before = np.asarray(model.fc.kernel[...])
    sd = {
        "fc.weight": np.zeros((5, 8), np.float32),  # wrong out-features
        "head.weight": np.zeros((2, 2), np.float32),  # not in the model
        "dense.bias": np.full((4,), 3.0, np.float32),  # renamed by the mapping
    }
    report = load_torch_weights(model, sd, mapping={"dense.bias": "fc/bias"})
    assert isinstance(report, LoadReport)
    assert report.unexpected_keys == ["head.weight"]
    assert report.mismatched_keys == [("fc.weight", (8, 5), (8, 4))]
    assert "fc/kernel" in report.missing_keys and "fc/bias" not in report.missing_keys
    np.testing.assert_array_equal(model.fc.kernel[...], before)  # mismatches are not loaded
    np.testing.assert_array_equal(model.fc.bias[...], np.full(4, 3.0))
    report = load_torch_weights(model, sd, mapping=lambda n: "fc/bias" if n[0] == "d" else None)
    assert report.unexpected_keys == [] and report.mismatched_keys == []  # others skipped
    assert "fc/bias" not in report.missing_keys and "fc/kernel" in report.missing_keys
