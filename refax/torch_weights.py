"""Loading PyTorch ``state_dict`` weights (safetensors files) into refax models.

``load_torch_weights(model, source)`` maps each PyTorch name (``"block.0.weight"``) to a path
of the model (``block/0/kernel``) and converts the layout on the way:

* Linear / Conv kernels: torch stores ``weight`` as ``(out, in)`` or ``(out, in, *window)``;
  refax's ``kernel`` is ``(in, out)`` or ``(*window, in, out)``.
* Normalisation layers: ``weight`` -> ``scale``, ``running_mean`` -> ``mean``,
  ``running_var`` -> ``var`` (``num_batches_tracked`` has no refax counterpart and is skipped).
* Embeddings: ``weight`` -> ``embedding``.

Like ``torch.nn.Module.load_state_dict(strict=False)`` it loads what fits and returns a
:class:`LoadReport` of the missing keys (model Variables nothing was loaded into), the
unexpected keys (checkpoint entries with no place in the model) and the shape mismatches
(which are not loaded). ``.safetensors`` files are read with ``safetensors.numpy``: plain
arrays, no code is executed.

Example:
  >>> import numpy as np
  >>> from refax import nnx
  >>> from refax.torch_weights import load_torch_weights
  >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> weight = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch layout (out, in)
  >>> report = load_torch_weights(model, {"weight": weight, "bias": np.ones(2, np.float32)})
  >>> report.missing_keys, report.unexpected_keys, report.mismatched_keys
  ([], [], [])
  >>> model.kernel.shape
  (3, 2)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from refax._graph import state as _state
from refax._rngs import RngState
from refax._statelib import to_flat_state
from refax._variables import Variable

__all__ = ["LoadReport", "load_torch_weights", "torch_to_refax_name"]

_RENAMES = {"running_mean": "mean", "running_var": "var"}
_SKIPPED = ("num_batches_tracked",)


@dataclasses.dataclass
class LoadReport:
    """What ``load_torch_weights`` did not load (``torch``'s ``strict=False`` report).

    Args:
      missing_keys: model paths (``"a/0/kernel"``) that received nothing.
      unexpected_keys: torch names with no Variable in the model.
      mismatched_keys: ``(torch name, checkpoint shape in refax layout, model shape)`` for
        entries left unloaded because their shapes differ.

    Example:
      >>> from refax.torch_weights import LoadReport
      >>> LoadReport([], ["fc.extra"], []).unexpected_keys
      ['fc.extra']
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def _key(part: str) -> Any:
    return int(part) if part.isdigit() else part


def torch_to_refax_name(name: str, params: Mapping[tuple, Any]) -> tuple | None:
    """The default mapping of a torch ``state_dict`` name onto a model path.

    Args:
      name: the torch name, e.g. ``"layers.0.weight"``.
      params: the model's flat state ``{path: Variable}`` (used to tell ``weight`` apart:
        ``kernel``, ``scale`` or ``embedding``, whichever the module has).

    Returns:
      The model path, or ``None`` for entries that have no counterpart
      (``num_batches_tracked``).

    Example:
      >>> from refax import nnx
      >>> from refax.torch_weights import torch_to_refax_name
      >>> flat = dict(nnx.to_flat_state(nnx.state(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))))
      >>> torch_to_refax_name("running_var", flat), torch_to_refax_name("weight", flat)
      (('var',), ('scale',))
    """
    parts = name.split(".")
    *prefix, last = parts
    if last in _SKIPPED:
        return None
    prefix_keys = tuple(_key(p) for p in prefix)
    if last == "weight":
        for candidate in ("kernel", "scale", "embedding", "weight"):
            if (*prefix_keys, candidate) in params:
                return (*prefix_keys, candidate)
        return (*prefix_keys, "kernel")
    return (*prefix_keys, _RENAMES.get(last, _key(last)))


def _to_refax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """Torch layout -> refax layout, decided by the target Variable's name and rank."""
    if path and path[-1] == "kernel" and value.ndim >= 2:
        # (out, in, *window) -> (*window, in, out); for Linear (out, in) -> (in, out)
        return np.transpose(value, (*range(2, value.ndim), 1, 0))
    return value


def load_torch_weights(
    model: Any,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    mapping: Mapping[str, str] | Callable[[str], str | None] | None = None,
) -> LoadReport:
    """Loads a PyTorch ``state_dict`` into ``model``'s Variables in place.

    Args:
      model: the refax model.
      source: a ``.safetensors`` file path, or a mapping ``{torch name: array}``.
      mapping: optional renaming of torch names: a dict ``{torch name: refax path}`` (paths
        written ``"a/0/kernel"``; names it lacks use :func:`torch_to_refax_name`), or a
        function of every name returning its path (or ``None`` to skip the entry).
        Layouts follow the target's name (``kernel`` is transposed from torch's layout).

    Returns:
      A :class:`LoadReport` of missing keys, unexpected keys and shape mismatches; everything
      else was loaded (cast to each Variable's dtype).

    Example:
      >>> import numpy as np, os, tempfile
      >>> from safetensors.numpy import save_file
      >>> from refax import nnx
      >>> from refax.torch_weights import load_torch_weights
      >>> path = os.path.join(tempfile.mkdtemp(), "conv.safetensors")
      >>> save_file({"conv.weight": np.zeros((8, 3, 5, 5), np.float32)}, path)
      >>> class Net(nnx.Module):
      ...     def __init__(self):
      ...         self.conv = nnx.Conv(3, 8, (5, 5), rngs=nnx.Rngs(0))
      >>> net = Net()
      >>> report = load_torch_weights(net, path)
      >>> report.missing_keys, net.conv.kernel.shape, float(abs(net.conv.kernel[...]).sum())
      (['conv/bias'], (5, 5, 3, 8), 0.0)
    """
    if isinstance(source, (str, os.PathLike)):
        from safetensors.numpy import load_file  # optional dependency: plain arrays, no code

        weights: Mapping[str, Any] = load_file(os.fspath(source))
    else:
        weights = source
    flat = {p: v for p, v in to_flat_state(_state(model)) if isinstance(v, Variable)}
    by_name = {"/".join(map(str, p)): p for p in flat}

    def target_of(name: str) -> tuple | None:
        if callable(mapping):
            mapped = mapping(name)
            if mapped is None:
                return None
            return by_name.get(mapped, tuple(_key(k) for k in mapped.split("/")))
        if mapping is not None and name in mapping:
            return by_name.get(mapping[name], tuple(_key(k) for k in mapping[name].split("/")))
        return torch_to_refax_name(name, flat)

    loaded: set[tuple] = set()
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    updates: dict[tuple, Any] = {}
    for name, array in weights.items():
        if name.split(".")[-1] in _SKIPPED and mapping is None:
            continue
        path = target_of(name)
        if path is None:
            continue
        if path not in flat:
            unexpected.append(name)
            continue
        value = _to_refax_layout(path, np.asarray(array))
        var = flat[path]
        if tuple(value.shape) != tuple(var.shape):
            mismatched.append((name, tuple(value.shape), tuple(var.shape)))
            continue
        updates[path] = jnp.asarray(value, dtype=var.dtype)
        loaded.add(path)
    for path, value in updates.items():
        flat[path].set_value(value)
    missing = [  # RNG state has no torch counterpart: never reported
        "/".join(map(str, p))
        for p, v in flat.items()
        if p not in loaded and not isinstance(v, RngState)
    ]
    return LoadReport(missing, unexpected, mismatched)
