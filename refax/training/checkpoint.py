"""Checkpoints of States through orbax-checkpoint (no format of refax's own).

``save(path, node)`` writes the State of a model, optimizer or any graph node (or a State, or
a pure dict from ``nnx.to_pure_dict``) as an orbax ``StandardCheckpointer`` checkpoint: a
directory of tensorstore arrays and JSON metadata, written under a temporary name and renamed
when complete, so an interrupted save never leaves a half-written checkpoint behind and never
touches another one. Loading reads arrays only: nothing is unpickled or executed.

``restore(path, target)`` reads a checkpoint into ``target``: a concrete model (its Variables
are overwritten in place), an abstract one made with ``nnx.eval_shape`` (no throwaway
initialisation; its Variables receive the arrays, with the shardings their abstract values
carry), a State, or a pure dict. Before anything is read the checkpoint's paths and shapes are
checked against the target; a checkpoint that does not fit raises :class:`CheckpointMismatchError`
listing the missing, unexpected and mis-shaped paths, and the target is left unchanged.

Typed PRNG keys (``RngKey`` Variables) are stored as their raw ``uint32`` key data and turned
back into keys of the target's implementation on restore.

Example:
  >>> import tempfile, os
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> from refax.training import checkpoint
  >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> path = checkpoint.save(os.path.join(tempfile.mkdtemp(), "ckpt"), model)
  >>> abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
  >>> restored = checkpoint.restore(path, abstract)
  >>> bool(jnp.all(restored.kernel[...] == model.kernel[...]))
  True
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from refax._graph import is_graph_node
from refax._graph import state as _state
from refax._statelib import State, restore_int_paths, to_flat_state
from refax._variables import Variable

__all__ = ["save", "restore", "load_pure_dict", "metadata", "CheckpointMismatchError"]

_OLD = ".refax-old"
_NEW = ".refax-new"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the target; nothing was restored.

    Args:
      path: the checkpoint's directory.
      missing: paths the target has and the checkpoint lacks.
      unexpected: paths the checkpoint has and the target lacks.
      mismatched: ``(path, checkpoint shape, target shape)`` for paths whose shapes differ.

    Example:
      >>> from refax.training.checkpoint import CheckpointMismatchError
      >>> err = CheckpointMismatchError("/tmp/c", ["a/kernel"], [], [])
      >>> err.missing, isinstance(err, ValueError)
      (['a/kernel'], True)
    """

    def __init__(self, path: Any, missing: list, unexpected: list, mismatched: list):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"The checkpoint at {path} does not fit the target; nothing was restored."]
        if self.missing:
            lines.append("Missing in the checkpoint: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("Unexpected in the checkpoint: " + ", ".join(self.unexpected))
        for p, got, want in self.mismatched:
            lines.append(f"Shape mismatch at {p}: checkpoint {got}, target {want}")
        lines.append(
            "Restore into a model built with the same configuration, or restore the pure dict "
            "(load_pure_dict) and convert it yourself."
        )
        super().__init__("\n".join(lines))


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp  # the checkpoint dependency, imported when first used

    return ocp.StandardCheckpointer()


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flat(target: Any) -> dict[tuple, Any]:
    """``{path: leaf}`` of a graph node, a State or a nested pure dict."""
    if is_graph_node(target):
        target = _state(target)
    if isinstance(target, State):
        return dict(to_flat_state(target))
    if isinstance(target, Mapping):
        out: dict[tuple, Any] = {}
        stack = [((), target)]
        while stack:
            prefix, level = stack.pop()
            for k, v in level.items():
                if isinstance(v, Mapping):
                    stack.append(((*prefix, k), v))
                else:
                    out[(*prefix, k)] = v
        return out
    raise TypeError(
        f"Expected a graph node (a Module, Optimizer, ...), a State or a pure dict, got "
        f"{type(target).__name__}."
    )


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _nest(flat: Mapping[tuple, Any]) -> dict:
    """A nested dict with string keys (what orbax stores) from ``{path: value}``."""
    out: dict = {}
    for path, value in flat.items():
        level = out
        for k in path[:-1]:
            level = level.setdefault(str(k), {})
        level[str(path[-1])] = value
    return out


def _raw(leaf: Any) -> Any:
    return leaf.get_raw_value() if isinstance(leaf, Variable) else leaf


def _resolve(path: pathlib.Path) -> pathlib.Path:
    """``path``, or the previous checkpoint kept aside by an overwrite that was interrupted."""
    if not path.exists():
        old = path.with_name(path.name + _OLD)
        if old.exists():
            return old
        raise FileNotFoundError(f"No checkpoint at {path}.")
    return path


def save(path: str | os.PathLike, target: Any, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the State of ``target`` as an orbax checkpoint directory at ``path``.

    Args:
      path: the checkpoint directory (created; its parent must exist).
      target: a graph node (model, optimizer, ...), a State, or a pure dict of arrays.
      overwrite: replace an existing checkpoint at ``path``. The new one is written under
        another name first; the old one is removed only once the new one is complete. With
        several processes every process calls ``save`` (as orbax requires) and the primary
        one replaces the directory.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: when ``path`` exists and ``overwrite`` is false.

    Example:
      >>> import tempfile, os
      >>> from refax import nnx
      >>> from refax.training import checkpoint
      >>> layer = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
      >>> p = checkpoint.save(os.path.join(tempfile.mkdtemp(), "c"), layer)
      >>> sorted(checkpoint.load_pure_dict(p))
      ['bias', 'kernel']
    """
    path = pathlib.Path(path).absolute()
    exists = path.exists()
    if exists and not overwrite:
        raise FileExistsError(f"A checkpoint exists at {path}; pass overwrite=True to replace it.")
    flat = {}
    for p, leaf in _flat(target).items():
        value = _raw(leaf)
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(
                f"Cannot save the abstract value at '{_name(p)}' ({value}); save a concrete "
                "model (restore into the abstract one first)."
            )
        flat[p] = jax.random.key_data(value) if _is_key(value) else value
    tree = _nest(flat)
    ckptr = _checkpointer()
    # With several processes (jax.distributed) every one calls save, orbax's save is
    # collective, and only the primary process moves directories, between barriers: every
    # process has looked at ``path`` before anything is written, and none returns before the
    # new checkpoint is in place.
    _barrier("refax.checkpoint.save: checked")
    if not exists:
        ckptr.save(path, tree)  # orbax writes under a temporary name, then renames
        ckptr.wait_until_finished()
        _barrier("refax.checkpoint.save: written")
        return path
    new = path.with_name(path.name + _NEW)
    old = path.with_name(path.name + _OLD)
    primary = jax.process_index() == 0
    if primary:
        for leftover in path.parent.glob(glob.escape(new.name) + "*"):
            shutil.rmtree(leftover)  # left by an interrupted overwrite: incomplete by construction
    _barrier("refax.checkpoint.save: cleaned")
    ckptr.save(new, tree)
    ckptr.wait_until_finished()
    _barrier("refax.checkpoint.save: written")
    if primary:
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        new.rename(path)
        shutil.rmtree(old)
    _barrier("refax.checkpoint.save: replaced")
    return path


def _barrier(name: str) -> None:
    """Waits for every process (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def metadata(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The paths, shapes and dtypes stored in a checkpoint (reads no array).

    Args:
      path: the checkpoint directory.

    Returns:
      ``{"a/b/kernel": (shape, dtype)}``.

    Example:
      >>> import tempfile, os
      >>> import jax.numpy as jnp
      >>> from refax.training import checkpoint
      >>> p = checkpoint.save(os.path.join(tempfile.mkdtemp(), "c"), {"w": jnp.zeros((2, 3))})
      >>> checkpoint.metadata(p)
      {'w': ((2, 3), dtype('float32'))}
    """
    tree = _checkpointer().metadata(_resolve(pathlib.Path(path).absolute())).item_metadata.tree
    return {_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flat(tree).items()}


def load_pure_dict(path: str | os.PathLike) -> dict:
    """Reads a checkpoint as a nested pure dict (integer-like keys become ints).

    PRNG keys come back as their raw ``uint32`` key data (the checkpoint does not say which
    arrays were keys; :func:`restore` into a model re-wraps them).

    Args:
      path: the checkpoint directory.

    Returns:
      A nested dict of arrays, as ``nnx.to_pure_dict`` gives (usable with
      ``nnx.replace_by_pure_dict``).

    Example:
      >>> import tempfile, os
      >>> import jax.numpy as jnp
      >>> from refax.training import checkpoint
      >>> tree = {"layers": {0: {"b": jnp.ones(2)}}}
      >>> p = checkpoint.save(os.path.join(tempfile.mkdtemp(), "c"), tree)
      >>> checkpoint.load_pure_dict(p)["layers"][0]["b"]
      Array([1., 1.], dtype=float32)
    """
    restored = _checkpointer().restore(_resolve(pathlib.Path(path).absolute()))
    return restore_int_paths(restored)


def _key_impl(like: Any) -> Any:
    if isinstance(like, jax.Array):
        return jax.random.key_impl(like)
    return like.dtype._impl  # an abstract key: its dtype names the implementation


def _concrete_sharding(sharding: Any, mesh: Any) -> Any:
    """``sharding`` on a concrete mesh (abstract models carry an ``AbstractMesh``)."""
    if not isinstance(sharding, jax.sharding.Sharding):
        return None
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):
        mesh = mesh if mesh is not None else jax.sharding.get_mesh()
        if mesh is None or getattr(mesh, "empty", False) or not hasattr(mesh, "devices"):
            raise ValueError(
                "The target's shardings refer to an abstract mesh; pass mesh= to restore, or "
                "call it inside `with jax.set_mesh(mesh):`."
            )
        return jax.sharding.NamedSharding(mesh, sharding.spec)
    return sharding


def _abstract(value: Any, mesh: Any = None) -> tuple[jax.ShapeDtypeStruct, bool]:
    """What orbax should read for a target value, and whether it is a PRNG key."""
    sharding = _concrete_sharding(getattr(value, "sharding", None), mesh)
    key = _is_key(value)
    if key:  # keys are stored as key data: trailing dims, uint32; placed after restore
        shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(value.shape, value.dtype))
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype), True
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding), False


def restore(path: str | os.PathLike, target: Any, *, mesh: Any = None) -> Any:
    """Reads the checkpoint at ``path`` into ``target``.

    Args:
      path: the checkpoint directory.
      target: a graph node (concrete, or abstract from ``nnx.eval_shape``), a State, or a pure
        dict of arrays / ``jax.ShapeDtypeStruct``. Shardings of its values (a concrete array's,
        or an abstract value's ``sharding``) decide where the restored arrays are placed.
      mesh: the concrete mesh for abstract shardings (default: the mesh set by
        ``jax.set_mesh``).

    Returns:
      ``target`` itself for a graph node or a State (its Variables now hold the restored
      arrays); a new pure dict for a pure dict target.

    Raises:
      CheckpointMismatchError: when the checkpoint's paths or shapes do not fit ``target``
        (then nothing of ``target`` is changed).

    Example:
      >>> import tempfile, os, optax
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.training import checkpoint
      >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      >>> _ = opt.update(model, nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model))
      >>> p = checkpoint.save(os.path.join(tempfile.mkdtemp(), "opt"), opt)
      >>> fresh = nnx.Optimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(1)), optax.adam(1e-3), wrt=nnx.Param)
      >>> int(checkpoint.restore(p, fresh).step[...])
      1
    """
    path = _resolve(pathlib.Path(path).absolute())
    flat = _flat(target)
    stored = metadata(path)
    wanted = {_name(p): p for p in flat}
    missing = [n for n in wanted if n not in stored]
    unexpected = [n for n in stored if n not in wanted]
    abstract: dict[tuple, Any] = {}
    keys: dict[tuple, Any] = {}
    mismatched = []
    for name, p in wanted.items():
        value = _raw(flat[p])
        spec, is_key = _abstract(value, mesh)
        if is_key:
            keys[p] = value
        abstract[p] = spec
        if name in stored and stored[name][0] != spec.shape:
            want = tuple(np.shape(value))
            mismatched.append((name, stored[name][0], want))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)
    restored = _checkpointer().restore(path, _nest(abstract))
    values = {p: v for p, v in _flat(restored).items()}
    out: dict[tuple, Any] = {}
    for p in flat:
        value = values[tuple(str(k) for k in p)]
        if p in keys:
            like = keys[p]
            value = jax.random.wrap_key_data(value, impl=_key_impl(like))
            sharding = _concrete_sharding(getattr(like, "sharding", None), mesh)
            if sharding is not None:
                value = jax.device_put(value, sharding)
        out[p] = value
    if isinstance(target, Mapping) and not isinstance(target, State):
        return restore_int_paths(_nest(out))
    for p, leaf in flat.items():  # every read succeeded: now write
        if isinstance(leaf, Variable):
            leaf.set_raw_value(out[p])
        elif isinstance(target, State):
            level = target
            for k in p[:-1]:
                level = level[k]
            level[p[-1]] = out[p]
    return target
