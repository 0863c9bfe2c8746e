"""Variable modes backed by JAX's mutable array references, and the process-wide defaults.

A Variable normally stores its value as an immutable ``jax.Array`` and *replaces* it on every
write; the box is what is mutable. Two modes store the value in JAX's own mutable array
references (``jax.new_ref``, ``jax.Ref``) instead, so writes go *into* the reference and JAX
itself carries them through its transforms:

* ``ref=True``: the Variable holds a ``jax.Ref`` (a pytree of them for a pytree value) and hands
  it out as its raw value (``v.get_raw_value()``); ``v[...]`` reads it, ``v[...] = x`` writes it.
  Every holder of the reference sees every write, including a plain ``jax.jit`` that received
  the Variable as an argument or captured it.
* ``hijax=True``: the same storage, kept private: ``get_raw_value()`` returns plain arrays, and
  a write of another shape, dtype or structure outside of any trace simply makes new
  references. Such a Variable can be handed to plain ``jax.jit`` and mutated there.

A reference has a fixed shape and dtype. Writes are broadcast and cast to it where NumPy's
rules allow, otherwise JAX refuses them. References cannot leave a ``jax.jit`` as outputs.

:func:`var_defaults` sets the modes a new Variable gets when its constructor is not told.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from refax import nnx
  >>> v = nnx.Variable(jnp.zeros(3), ref=True)
  >>> isinstance(v.get_raw_value(), jax.Ref)
  True
  >>> @jax.jit
  ... def bump(v):
  ...   v[...] += 1
  >>> bump(v)
  >>> v[...]
  Array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from refax._config import _env_flag, _Flag, _FlagSetter

__all__ = ["VarDefaults", "var_defaults", "is_array_ref"]

Ref = jax.Ref
_Tracer = jax.core.Tracer


# -- defaults ----------------------------------------------------------------------------------
class _ModeFlag(_Flag):
    """A per-thread default that starts False (``_Flag`` starts True)."""

    def __init__(self, name: str, env: str) -> None:
        self.name = name
        self.stack = [_env_flag(env, False)]


_HIJAX = _ModeFlag("flax_hijax_variable", "FLAX_HIJAX_VARIABLE")
_REF = _ModeFlag("flax_array_ref", "FLAX_ARRAY_REF")


class VarDefaults(Mapping[str, bool]):
    """The modes a new Variable gets by default: ``hijax`` and ``ref`` (a read-only mapping).

    Example:
      >>> from refax import nnx
      >>> d = nnx.var_defaults()
      >>> d.hijax, d["ref"], dict(d)
      (False, False, {'hijax': False, 'ref': False})
    """

    __slots__ = ("hijax", "ref")

    def __init__(self, hijax: bool, ref: bool):
        object.__setattr__(self, "hijax", hijax)
        object.__setattr__(self, "ref", ref)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("VarDefaults is read-only; use nnx.var_defaults(...) to change it.")

    def __getitem__(self, key: str) -> bool:
        if key == "hijax":
            return self.hijax
        if key == "ref":
            return self.ref
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("hijax", "ref"))

    def __len__(self) -> int:
        return 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.hijax, self.ref))

    def __repr__(self) -> str:
        return f"VarDefaults(hijax={self.hijax}, ref={self.ref})"


class _VarDefaultsSetter:
    """Returned by ``var_defaults(...)``: already applied; a context manager or a decorator."""

    __slots__ = ("_setters",)

    def __init__(self, setters: list[_FlagSetter]):
        self._setters = setters

    def __enter__(self) -> VarDefaults:
        return var_defaults()

    def __exit__(self, *exc: Any) -> None:
        for setter in reversed(self._setters):
            setter.__exit__(*exc)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for setter in reversed(self._setters):
            fn = setter(fn)  # undoes the global change, applies it around each call
        return fn


def var_defaults(*, hijax: bool | None = None, ref: bool | None = None) -> Any:
    """Reads or sets the default modes of new Variables (per thread).

    With no arguments, returns the current :class:`VarDefaults`. With ``hijax`` and/or ``ref``,
    sets them at once and returns an object that restores the previous values when used as a
    context manager (``with nnx.var_defaults(ref=True): ...``); used as a decorator, it leaves
    the defaults unchanged and applies the new ones only while the function runs.

    Args:
      hijax: default of ``Variable(..., hijax=)``: values kept in private JAX references.
      ref: default of ``Variable(..., ref=)``: values kept in ``jax.Ref`` s handed out as the
        raw value.

    Returns:
      The current defaults (no arguments), or the setter (context manager / decorator).

    Example:
      >>> from refax import nnx
      >>> with nnx.var_defaults(ref=True):
      ...   nnx.Variable(1.0).ref
      True
      >>> nnx.var_defaults().ref
      False
      >>> @nnx.var_defaults(hijax=True)
      ... def make():
      ...   return nnx.Param(0.0)
      >>> make().hijax, nnx.var_defaults().hijax
      (True, False)
    """
    if hijax is None and ref is None:
        return VarDefaults(_HIJAX.stack[-1], _REF.stack[-1])
    setters = []
    for name, flag, value in (("hijax", _HIJAX, hijax), ("ref", _REF, ref)):
        if value is None:
            continue
        if not isinstance(value, bool):
            raise TypeError(f"var_defaults: {name} must be a bool, got {value!r}.")
        setters.append(_FlagSetter(flag, value))
    return _VarDefaultsSetter(setters)


def default_modes() -> tuple[bool, bool]:
    """``(hijax, ref)`` defaults, read on every Variable construction."""
    return _HIJAX.stack[-1], _REF.stack[-1]


# -- storage -------------------------------------------------------------------------------------
def is_array_ref(x: Any) -> TypeGuard[Ref]:
    """True for a ``jax.Ref`` (concrete or traced).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax.nnx import variablelib
      >>> variablelib.is_array_ref(jax.new_ref(jnp.zeros(2))), variablelib.is_array_ref(1.0)
      (True, False)
    """
    return isinstance(x, Ref)


def _ref_leaf(x: Any) -> bool:
    return isinstance(x, Ref)


def has_refs(value: Any) -> bool:
    if isinstance(value, Ref):
        return True
    if isinstance(value, (jax.Array, np.ndarray, int, float, complex, bool)):
        return False
    return any(isinstance(x, Ref) for x in jax.tree.leaves(value, is_leaf=_ref_leaf))


def _refable(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool))


def to_refs(value: Any) -> Any:
    """``value`` with every array (or number) leaf moved into a new ``jax.Ref``."""
    if isinstance(value, Ref):
        return value
    if _refable(value):
        return jax.new_ref(value)
    return jax.tree.map(
        lambda x: x if isinstance(x, Ref) or not _refable(x) else jax.new_ref(x),
        value,
        is_leaf=_ref_leaf,
    )


def read(storage: Any) -> Any:
    """The plain value of a storage: references read (a fresh container for a pytree)."""
    if isinstance(storage, Ref):
        return storage[...]
    if isinstance(storage, (jax.Array, np.ndarray)):
        return storage
    return jax.tree.map(lambda x: x[...] if isinstance(x, Ref) else x, storage, is_leaf=_ref_leaf)


def read_at(storage: Any, index: Any) -> Any:
    """``read(storage)[index]``, reading only the part asked for."""
    if isinstance(storage, Ref):
        return storage[index]
    if isinstance(storage, (jax.Array, np.ndarray)):
        return storage[index]
    return read(storage[index])


def concrete(storage: Any) -> bool:
    """True when no reference of the storage is a tracer (new references may replace them)."""
    if isinstance(storage, Ref):
        return not isinstance(storage, _Tracer)
    return not any(isinstance(x, _Tracer) for x in jax.tree.leaves(storage, is_leaf=_ref_leaf))


WHOLE = object()  # ``write`` index meaning "replace the whole value"


def _fit(ref: Ref, index: Any, value: Any) -> Any:
    """``value`` cast and broadcast to ``ref[index]``, as ``array.at[index].set`` would."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or dtype != ref.dtype:
        value = jnp.asarray(value, dtype=ref.dtype)
    target = np.broadcast_to(np.empty((), bool), ref.shape)[index].shape
    if np.shape(value) != target:
        value = jnp.broadcast_to(value, target)
    return value


def fits(ref: Ref, value: Any) -> bool:
    """True when ``value`` can replace the whole content of ``ref`` (same shape and dtype)."""
    if np.shape(value) != tuple(ref.shape):
        return False
    dtype = getattr(value, "dtype", None)
    if dtype is None:  # a Python number: takes the reference's dtype
        return True
    return jax.dtypes.canonicalize_dtype(dtype) == ref.dtype


def write(storage: Any, index: Any, value: Any) -> bool:
    """Writes ``value`` into the references of ``storage``.

    ``index`` is :data:`WHOLE` (replace the value: shapes, dtypes and structure must match),
    a container key (replace that entry) or an array index (``...`` included: cast and
    broadcast like ``array.at[index].set``). Returns False, writing nothing, when the value
    needs new references.
    """
    if isinstance(storage, Ref):
        if index is WHOLE:
            if not fits(storage, value):
                return False
            index = Ellipsis
        storage[index] = _fit(storage, index, value)
        return True
    if index is WHOLE or index is Ellipsis:
        leaves, treedef = jax.tree.flatten(storage, is_leaf=_ref_leaf)
        try:
            values = treedef.flatten_up_to(value)
        except (ValueError, TypeError):
            return False
        for r, x in zip(leaves, values):
            if not (fits(r, x) if isinstance(r, Ref) else r is x):
                return False
        for r, x in zip(leaves, values):
            if isinstance(r, Ref):
                r[...] = _fit(r, Ellipsis, x)
        return True
    try:
        sub = storage[index]
    except (KeyError, IndexError, TypeError):
        return False
    return write(sub, WHOLE, value)
