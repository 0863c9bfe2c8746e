"""Metrics whose running state lives in Variables.

A metric accumulates statistics over batches with ``update(**batch)``, reports them with
``compute()`` and starts over with ``reset()``. Its state is held in ``MetricState`` Variables,
so a metric is part of the object graph: it can be passed to ``nnx.jit`` (or split, merged and
passed to ``jax.jit``) together with the model, and its updates inside the transform come
back out.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average())
  >>> @nnx.jit
  ... def step(metrics, logits, labels, loss):
  ...     metrics.update(logits=logits, labels=labels, values=loss)
  >>> step(metrics, jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([1, 1]), jnp.array(3.0))
  >>> {k: float(v) for k, v in metrics.compute().items()}
  {'accuracy': 0.5, 'loss': 3.0}
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refax._graph import split as _split
from refax._object import Pytree
from refax._variables import Variable

__all__ = [
    "Metric",
    "MetricState",
    "Average",
    "Accuracy",
    "Welford",
    "Statistics",
    "MultiMetric",
]


class MetricState(Variable):
    """The Variable type holding a metric's running state.

    Args:
      value: the initial value (an array).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> s = nnx.metrics.MetricState(jnp.array(0.0))
      >>> s.value += 2.0
      >>> float(s.value)
      2.0
    """

    __slots__ = ()


class Metric(Pytree):
    """Base class of metrics: subclasses implement ``update``, ``compute`` and ``reset``.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Max(nnx.Metric):
      ...     def __init__(self):
      ...         self.best = nnx.metrics.MetricState(jnp.array(-jnp.inf))
      ...     def update(self, *, values, **_):
      ...         self.best.value = jnp.maximum(self.best.value, jnp.max(values))
      ...     def compute(self):
      ...         return self.best.value
      ...     def reset(self):
      ...         self.best.value = jnp.array(-jnp.inf)
      >>> m = Max()
      >>> m.update(values=jnp.array([1.0, 5.0]))
      >>> float(m.compute())
      5.0
    """

    def update(self, **kwargs: Any) -> None:
        """Accumulates one batch.

        Args:
          **kwargs: the batch's values, by name.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement update().")

    def compute(self) -> Any:
        """Returns the metric's value over everything accumulated since the last reset."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute().")

    def reset(self) -> None:
        """Forgets everything accumulated."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset().")

    def split(self, *filters: Any) -> tuple[Any, ...]:
        """Shorthand for ``nnx.split(self, *filters)``.

        Args:
          *filters: optional filters partitioning the metric's state.

        Returns:
          ``(graphdef, state, ...)`` as :func:`refax.split` returns them.
        """
        return _split(self, *filters)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float, bool, np.number)) and not isinstance(x, np.ndarray)


def _broadcast_mask(mask: Any, values: jax.Array, what: str) -> jax.Array:
    """``mask`` shaped to broadcast against ``values`` (its shape a prefix of theirs)."""
    mask = jnp.asarray(mask)
    if mask.ndim <= values.ndim and values.shape[: mask.ndim] == mask.shape:
        return jnp.reshape(mask, mask.shape + (1,) * (values.ndim - mask.ndim))
    try:
        return jnp.broadcast_to(mask, values.shape)
    except ValueError:
        raise ValueError(
            f"{what}: mask of shape {mask.shape} does not fit values of shape {values.shape}; "
            "give a mask whose shape is a prefix of the values' shape."
        ) from None


class Average(Metric):
    """Running mean of the values passed under ``argname``.

    ``compute()`` is ``total / count``: NaN before the first update.

    Args:
      argname: the keyword of ``update`` holding the values (default ``'values'``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> avg = nnx.metrics.Average()
      >>> avg.update(values=jnp.array([1.0, 2.0, 3.0]))
      >>> avg.update(values=jnp.array([6.0]), mask=jnp.array([True]))
      >>> float(avg.compute())
      3.0
    """

    def __init__(self, argname: str = "values"):
        self.argname = argname
        self.total = MetricState(jnp.array(0, dtype=jnp.float32))
        self.count = MetricState(jnp.array(0, dtype=jnp.int32))

    def reset(self) -> None:
        """Sets total and count back to zero."""
        self.total.value = jnp.zeros_like(self.total.value)
        self.count.value = jnp.zeros_like(self.count.value)

    def update(self, mask: jax.Array | None = None, **kwargs: Any) -> None:
        """Adds the values under ``argname`` (every element counts once).

        Args:
          mask: optional array selecting which elements count (its shape a prefix of the
            values' shape); not allowed with a Python scalar value.
          **kwargs: must contain ``argname``; other keywords are ignored.

        Raises:
          TypeError: when ``argname`` is missing. ValueError: mask with a scalar value.
        """
        if self.argname not in kwargs:
            raise TypeError(
                f"{type(self).__name__}.update() expects the keyword argument "
                f"{self.argname!r} (got {sorted(kwargs)}); pass it, or build the metric with "
                f"argname=<your keyword>."
            )
        values = kwargs[self.argname]
        if _is_scalar(values):
            if mask is not None:
                raise ValueError(
                    f"{type(self).__name__}.update(): the value {values!r} is a Python scalar, "
                    "so a mask cannot apply; the values should be a jax array to use a mask."
                )
            self.total.value = self.total.value + jnp.asarray(values, self.total.value.dtype)
            self.count.value = self.count.value + 1
            return
        values = jnp.asarray(values)
        if mask is None:
            total = values.sum()
            count = values.size
        else:
            m = _broadcast_mask(mask, values, f"{type(self).__name__}.update()")
            total = jnp.where(m, values, 0).sum()
            count = jnp.broadcast_to(m, values.shape).astype(jnp.int32).sum()
        self.total.value = self.total.value + total.astype(self.total.value.dtype)
        self.count.value = self.count.value + jnp.asarray(count).astype(self.count.value.dtype)

    def compute(self) -> jax.Array:
        """Returns ``total / count``."""
        return self.total.value / self.count.value


class Accuracy(Average):
    """Fraction of correct predictions.

    Multi-class (``threshold=None``): ``logits`` have one more (last) axis than ``labels`` and
    the prediction is their argmax. Binary: ``logits`` and ``labels`` have the same shape and
    the prediction is ``logits > threshold``.

    Args:
      threshold: ``None`` for multi-class, else the binary decision threshold.
      *args: forwarded to :class:`Average`.
      **kwargs: forwarded to :class:`Average`.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> acc = nnx.metrics.Accuracy()
      >>> acc.update(logits=jnp.array([[0.1, 0.9], [0.8, 0.2]]), labels=jnp.array([1, 1]))
      >>> float(acc.compute())
      0.5
      >>> binary = nnx.metrics.Accuracy(threshold=0.5)
      >>> binary.update(logits=jnp.array([0.7, 0.2]), labels=jnp.array([1, 0]))
      >>> float(binary.compute())
      1.0
    """

    def __init__(self, threshold: float | None = None, *args: Any, **kwargs: Any):
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise TypeError(f"Accuracy threshold must be a number or None, got {threshold!r}.")
        self.threshold = threshold
        super().__init__(*args, **kwargs)

    def update(  # type: ignore[override]
        self,
        *,
        logits: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
        **_: Any,
    ) -> None:
        """Counts the correct predictions of one batch.

        Args:
          logits: scores, shape ``labels.shape + (classes,)`` (multi-class) or
            ``labels.shape`` (binary).
          labels: integer labels (multi-class) or 0/1 targets (binary).
          mask: optional boolean array, shape of ``labels``, selecting the counted examples.
          **_: other keywords are ignored (so a MultiMetric can pass everything).

        Raises:
          ValueError: when the shapes do not fit the mode.
        """
        logits = jnp.asarray(logits)
        labels = jnp.asarray(labels)
        if self.threshold is None:
            if logits.ndim != labels.ndim + 1:
                raise ValueError(
                    "For multi-class classification (threshold=None) the logits need one more "
                    f"axis than the labels: got logits.shape={logits.shape}, "
                    f"labels.shape={labels.shape}. For binary classification pass threshold=."
                )
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(
                    "For multi-class classification the labels must be integers, got "
                    f"dtype {labels.dtype}."
                )
            correct = jnp.argmax(logits, axis=-1) == labels
        else:
            if logits.shape != labels.shape:
                raise ValueError(
                    "For binary classification (threshold set) logits and labels need the same "
                    f"shape: got logits.shape={logits.shape}, labels.shape={labels.shape}."
                )
            correct = (logits > self.threshold) == labels.astype(bool)
        super().update(mask=mask, **{self.argname: correct})


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Summary statistics computed by :class:`Welford` (a pytree).

    Args:
      mean: the mean of all values seen.
      standard_error_of_mean: ``standard_deviation / sqrt(count)``.
      standard_deviation: the population standard deviation.

    Example:
      >>> from refax import nnx
      >>> s = nnx.metrics.Statistics(mean=1.0, standard_error_of_mean=0.1, standard_deviation=1.0)
      >>> s.mean
      1.0
    """

    mean: Any
    standard_error_of_mean: Any
    standard_deviation: Any


jax.tree_util.register_dataclass(
    Statistics,
    data_fields=["mean", "standard_error_of_mean", "standard_deviation"],
    meta_fields=[],
)


class Welford(Metric):
    """Running mean and standard deviation (Welford's algorithm, merged batch by batch).

    Args:
      argname: the keyword of ``update`` holding the values (default ``'values'``).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> w = nnx.metrics.Welford()
      >>> w.update(values=jnp.array([1.0, 3.0]))
      >>> w.update(values=jnp.array([5.0, 7.0]))
      >>> stats = w.compute()
      >>> float(stats.mean), round(float(stats.standard_deviation), 4)
      (4.0, 2.2361)
    """

    def __init__(self, argname: str = "values"):
        self.argname = argname
        self.count = MetricState(jnp.array(0, dtype=jnp.int32))
        self.mean = MetricState(jnp.array(0, dtype=jnp.float32))
        self.m2 = MetricState(jnp.array(0, dtype=jnp.float32))

    def reset(self) -> None:
        """Sets count, mean and the sum of squared deviations back to zero."""
        for var in (self.count, self.mean, self.m2):
            var.value = jnp.zeros_like(var.value)

    def update(self, mask: jax.Array | None = None, **kwargs: Any) -> None:
        """Merges the statistics of the values under ``argname``.

        Args:
          mask: optional array selecting the counted elements (shape a prefix of the values').
          **kwargs: must contain ``argname``; other keywords are ignored.

        Raises:
          TypeError: when ``argname`` is missing.
        """
        if self.argname not in kwargs:
            raise TypeError(
                f"Welford.update() expects the keyword argument {self.argname!r} "
                f"(got {sorted(kwargs)})."
            )
        values = jnp.asarray(kwargs[self.argname], dtype=jnp.float32)
        if mask is None:
            weights = jnp.ones_like(values)
        else:
            weights = jnp.broadcast_to(
                _broadcast_mask(mask, values, "Welford.update()"), values.shape
            ).astype(jnp.float32)
        n_b = weights.sum()
        mean_b = jnp.where(n_b > 0, (values * weights).sum() / jnp.maximum(n_b, 1), 0.0)
        m2_b = (weights * (values - mean_b) ** 2).sum()
        n_a = self.count.value.astype(jnp.float32)
        n = n_a + n_b
        delta = mean_b - self.mean.value
        safe_n = jnp.maximum(n, 1)
        self.mean.value = self.mean.value + delta * n_b / safe_n
        self.m2.value = self.m2.value + m2_b + delta**2 * n_a * n_b / safe_n
        self.count.value = self.count.value + n_b.astype(self.count.value.dtype)

    def compute(self) -> Statistics:
        """Returns the :class:`Statistics` of everything seen (NaN before any update)."""
        variance = self.m2.value / self.count.value
        std = jnp.sqrt(variance)
        return Statistics(
            mean=jnp.where(self.count.value > 0, self.mean.value, jnp.nan),
            standard_error_of_mean=std / jnp.sqrt(self.count.value),
            standard_deviation=std,
        )


def _accepts_mask(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover
        return True
    return any(p.name == "mask" or p.kind is p.VAR_KEYWORD for p in params)


class MultiMetric(Metric):
    """Several named metrics updated together.

    ``update(**batch)`` passes every keyword to every metric (metrics ignore those they do not
    use); ``mask`` may be a dict naming the mask of each metric, or one array for all.
    ``compute()`` returns a dict, in the order the metrics were given.

    Args:
      **metrics: the metrics, by name.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> m = nnx.MultiMetric(loss=nnx.metrics.Average(), acc=nnx.metrics.Accuracy())
      >>> m.update(values=jnp.array([1.0, 3.0]), logits=jnp.eye(2), labels=jnp.array([0, 0]))
      >>> {k: float(v) for k, v in m.compute().items()}
      {'loss': 2.0, 'acc': 0.5}
    """

    def __init__(self, **metrics: Metric):
        for name, metric in metrics.items():
            if name in ("update", "compute", "reset", "split"):
                raise ValueError(f"MultiMetric: {name!r} is a method name; name the metric else.")
            setattr(self, name, metric)
        self._metric_names = tuple(metrics)

    def update(self, **updates: Any) -> None:
        """Updates every metric with the same keywords.

        Args:
          **updates: the batch's values; ``mask`` (optional) is a dict ``{metric name: mask}``
            or one mask for every metric.
        """
        mask = updates.pop("mask", None)
        for name in self._metric_names:
            metric = getattr(self, name)
            kwargs = dict(updates)
            if isinstance(mask, Mapping):
                if name in mask:
                    kwargs["mask"] = mask[name]
            elif mask is not None:
                kwargs["mask"] = mask
            if "mask" in kwargs and kwargs["mask"] is None and not _accepts_mask(metric.update):
                del kwargs["mask"]
            metric.update(**kwargs)

    def compute(self) -> dict[str, Any]:
        """Returns ``{name: metric.compute()}``."""
        return {name: getattr(self, name).compute() for name in self._metric_names}

    def reset(self) -> None:
        """Resets every metric."""
        for name in self._metric_names:
            getattr(self, name).reset()
