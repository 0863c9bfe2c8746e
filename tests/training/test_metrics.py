"""Tests for nnx.metrics, nnx.Metric and nnx.MultiMetric (refax/training/metrics.py)."""

import flax.nnx as fnnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refax import nnx

LOGITS = np.array([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, -1.0]], np.float32)


def test_metric_state_is_a_variable_in_the_graph():
    avg = nnx.metrics.Average()
    assert isinstance(avg.total, nnx.metrics.MetricState)
    assert issubclass(nnx.metrics.MetricState, nnx.Variable)
    _, state = nnx.split(avg)
    assert sorted(nnx.to_pure_dict(state)) == ["count", "total"]


def test_metric_base_is_abstract():
    m = nnx.Metric()
    for call in (m.compute, m.reset, lambda: m.update(values=1)):
        with pytest.raises(NotImplementedError):
            call()


def test_average_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5,))
    avg = nnx.metrics.Average()
    avg.update(values=jnp.asarray(a))
    avg.update(values=jnp.asarray(b))
    expected = np.concatenate([a.ravel(), b]).mean()
    np.testing.assert_allclose(avg.compute(), expected, rtol=1e-6)
    assert int(avg.count.value) == 17


def test_average_mask_prefix_broadcast():
    values = jnp.arange(6.0).reshape(3, 2)
    avg = nnx.metrics.Average()
    avg.update(values=values, mask=jnp.array([True, False, True]))
    np.testing.assert_allclose(avg.compute(), (0 + 1 + 4 + 5) / 4)
    with pytest.raises(ValueError, match="does not fit"):
        avg.update(values=values, mask=jnp.ones(5, bool))


def test_average_scalar_and_errors():
    avg = nnx.metrics.Average("loss")
    avg.update(loss=2)
    avg.update(loss=4.0)
    assert float(avg.compute()) == 3.0
    with pytest.raises(TypeError, match="'loss'"):
        avg.update(values=1.0)
    with pytest.raises(ValueError, match="jax array"):
        avg.update(loss=1.0, mask=jnp.ones(1))
    avg.reset()
    assert np.isnan(avg.compute())


def test_accuracy_multiclass_and_binary_against_oracle():
    labels = np.array([1, 1, 0, 1, 0])
    ours, ref = nnx.metrics.Accuracy(), fnnx.metrics.Accuracy()
    for m in (ours, ref):
        m.update(logits=jnp.asarray(LOGITS), labels=jnp.asarray(labels))
    np.testing.assert_allclose(ours.compute(), ref.compute())
    ours, ref = nnx.metrics.Accuracy(threshold=0.5), fnnx.metrics.Accuracy(threshold=0.5)
    for m in (ours, ref):
        m.update(logits=jnp.array([0.4, 0.7, 0.2, 0.6]), labels=jnp.array([0, 1, 1, 1]))
    np.testing.assert_allclose(ours.compute(), ref.compute())
    assert float(ours.compute()) == 0.75


def test_accuracy_shape_errors():
    with pytest.raises(ValueError, match="For multi-class classification"):
        nnx.metrics.Accuracy().update(logits=jnp.zeros((2, 2, 2)), labels=jnp.zeros(4, int))
    with pytest.raises(ValueError, match="For binary classification"):
        nnx.metrics.Accuracy(0.5).update(logits=jnp.zeros(4), labels=jnp.zeros((2, 2), int))
    with pytest.raises(TypeError):
        nnx.metrics.Accuracy(threshold="high")


def test_welford_matches_numpy_over_batches():
    rng = np.random.default_rng(1)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (7, 1, 30)]
    w = nnx.metrics.Welford()
    for b in batches:
        w.update(values=jnp.asarray(b))
    allv = np.concatenate(batches)
    stats = w.compute()
    np.testing.assert_allclose(stats.mean, allv.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.standard_deviation, allv.std(), rtol=1e-5)
    np.testing.assert_allclose(
        stats.standard_error_of_mean, allv.std() / np.sqrt(allv.size), rtol=1e-5
    )
    # Statistics is a pytree
    assert len(jax.tree.leaves(stats)) == 3
    w.reset()
    assert int(w.count.value) == 0


def test_welford_mask():
    w = nnx.metrics.Welford()
    w.update(values=jnp.array([1.0, 100.0, 3.0]), mask=jnp.array([True, False, True]))
    np.testing.assert_allclose(w.compute().mean, 2.0)
    np.testing.assert_allclose(w.compute().standard_deviation, 1.0)


def test_statistics_fields():
    s = nnx.metrics.Statistics(mean=1.0, standard_error_of_mean=2.0, standard_deviation=3.0)
    assert (s.mean, s.standard_error_of_mean, s.standard_deviation) == (1.0, 2.0, 3.0)


def test_multimetric_masks_order_and_reset():
    m = nnx.MultiMetric(loss=nnx.metrics.Average(), accuracy=nnx.metrics.Accuracy())
    labels = jnp.array([1, 1, 0, 1, 0])
    m.update(
        logits=jnp.asarray(LOGITS),
        labels=labels,
        values=jnp.array([1.0, 2.0, 3.0, 4.0]),
        mask={"accuracy": labels > 0},
    )
    out = m.compute()
    assert list(out) == ["loss", "accuracy"]
    np.testing.assert_allclose(out["accuracy"], 2 / 3)
    np.testing.assert_allclose(out["loss"], 2.5)
    m.reset()
    assert all(np.isnan(v) for v in m.compute().values())
    hash(nnx.split(m)[0])


def test_multimetric_single_mask_for_all():
    m = nnx.MultiMetric(a=nnx.metrics.Average(), b=nnx.metrics.Average())
    m.update(values=jnp.array([1.0, 3.0]), mask=jnp.array([True, False]))
    assert {k: float(v) for k, v in m.compute().items()} == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="method name"):
        nnx.MultiMetric(update=nnx.metrics.Average())


def test_metrics_inside_nnx_jit_and_jax_jit():
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average(), w=nnx.metrics.Welford())

    @nnx.jit
    def step(metrics, x):
        metrics.update(values=x)

    step(metrics, jnp.array([1.0, 2.0]))
    step(metrics, jnp.array([3.0]))
    np.testing.assert_allclose(metrics.compute()["loss"], 2.0)
    np.testing.assert_allclose(metrics.compute()["w"].mean, 2.0)

    graphdef, state = metrics.split()

    @jax.jit
    def pure_step(state, x):
        m = nnx.merge(graphdef, state)
        m.update(values=x)
        return nnx.split(m)[1]

    state = pure_step(state, jnp.array([10.0]))
    np.testing.assert_allclose(nnx.merge(graphdef, state).compute()["loss"], 4.0)


def test_import_paths():
    import refax.nnx.metrics
    import refax.nnx.training.metrics

    assert refax.nnx.training.metrics.Average is nnx.metrics.Average
    assert refax.nnx.metrics.Welford is nnx.metrics.Welford
    assert nnx.Metric is nnx.metrics.Metric and nnx.MultiMetric is nnx.metrics.MultiMetric
