"""Variables: boxes holding one piece of state plus metadata.

A ``Variable`` holds a value (usually a ``jax.Array``) and a metadata dict. Subclasses give the
state a *kind* that filters select on: ``Param`` (trainable weights), ``BatchStat`` (running
statistics), ``Cache``, ``Intermediate``, ``Perturbation``, or any user subclass
(``class Count(nnx.Variable): pass``).

A Variable behaves like its value: arithmetic, comparison, indexing, ``shape``/``dtype`` and
any other attribute not found in the metadata are forwarded to it, and ``jnp.asarray(v)`` works.
Writes go through ``v[...] = x``, ``v.value = x`` or the in-place operators (``v += 1``), which
update the box in place so every holder of the reference sees the change.

Every Variable remembers the JAX trace it was created in; writing to it from another trace
raises :class:`refax.errors.TraceContextError`.

**Customising access.** A subclass may override ``get_value`` / ``set_value`` (every read and
write, ``v[...]`` and the operators included, then goes through them), ``create_value`` (run
once at construction) and ``add_axis`` / ``remove_axis`` (called when a transform adds or
removes a mapped axis). The older *hooks* (``on_get_value``, ``on_set_value``,
``on_create_value``, ``on_add_axis``, ``on_remove_axis``: callables, or tuples of them, given
as metadata, through :func:`with_metadata`, or defined as methods of a subclass) still run, in
that order of precedence. A Variable without any of these takes a fast path that reads and
writes its stored value directly.

**Modes.** ``ref=True`` and ``hijax=True`` keep the value in JAX mutable array references
(see ``refax/_refs.py`` and :func:`var_defaults`).

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> w = nnx.Param(jnp.ones((2, 3)), out_sharding=("a", None))
  >>> w.shape, w.out_sharding
  ((2, 3), ('a', None))
  >>> w[...] += 1
  >>> float(w.sum())
  12.0
"""

from __future__ import annotations

import copy as _copy
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from refax import _refs
from refax._refs import VarDefaults, default_modes, is_array_ref, var_defaults
from refax._sharding import shard_new_value
from refax._tracers import bump_epoch, current_trace
from refax.errors import TraceContextError

A = TypeVar("A")

__all__ = [
    "Variable",
    "Param",
    "BatchStat",
    "Cache",
    "Intermediate",
    "Perturbation",
    "VariableMetadata",
    "HijaxVariable",
    "VarDefaults",
    "var_defaults",
    "is_array_ref",
    "with_metadata",
    "variable_type_from_name",
    "variable_name_from_type",
    "register_variable_name",
]

_MISSING: Any = object()
_DEFAULT_METADATA: dict[str, Any] = {"hijax": False, "ref": False, "eager_sharding": True}
# Constructor keywords that are older spellings of a metadata key.
_METADATA_ALIASES = {"sharding_names": "out_sharding", "sharding": "out_sharding"}
_INTERNAL = frozenset({"_raw_value", "_var_metadata", "_trace_state", "_frozen", "_special"})
_MODES = ("hijax", "ref")
_HOOK_KEYS = ("on_get_value", "on_set_value", "on_create_value", "on_add_axis", "on_remove_axis")
_HOOK_SET = frozenset(_HOOK_KEYS)
_Ref = jax.Ref


class _DisplayHooks:
    """How Objects and Variables render (``repr``, treescope), installed by
    ``refax._display`` when it is imported: the display layer imports the objects it renders,
    they do not import it. Until then, plain ``object`` reprs."""

    __slots__ = ("object_repr", "treescope_object", "treescope_variable")

    def __init__(self) -> None:
        self.object_repr: Callable[[Any], str] = object.__repr__
        self.treescope_object: Callable[..., Any] = lambda obj, *_: NotImplemented
        self.treescope_variable: Callable[..., Any] = lambda var, *_: NotImplemented


DISPLAY = _DisplayHooks()


def _meta_plain(meta: Mapping[str, Any]) -> bool:
    """True when the metadata asks for nothing beyond plain storage (no mode, no hook)."""
    return not (meta.get("ref") or meta.get("hijax")) and _HOOK_SET.isdisjoint(meta)


def _as_hooks(hooks: Any) -> tuple[Callable[..., Any], ...]:
    if not hooks:
        return ()
    if callable(hooks):
        return (hooks,)
    return tuple(hooks)


class _Special:
    """What a Variable does beyond plain storage; ``None`` in ``_special`` means nothing.

    Built from the metadata and the class whenever either changes, so accessors only test
    ``self._special is None``.
    """

    __slots__ = ("get", "set", "create", "add_axis", "remove_axis", "refs", "hijax")

    def __init__(self, cls: type[Variable], meta: Mapping[str, Any]):
        class_hooks = cls._class_hooks
        hooks = []
        for key in _HOOK_KEYS:
            h = meta[key] if key in meta else class_hooks.get(key, ())
            hooks.append(_as_hooks(h))
        self.get, self.set, self.create, self.add_axis, self.remove_axis = hooks
        self.hijax = bool(meta.get("hijax"))
        self.refs = self.hijax or bool(meta.get("ref"))


def _special_for(cls: type[Variable], meta: Mapping[str, Any]) -> _Special | None:
    if cls._plain_class and _meta_plain(meta):
        return None
    return _Special(cls, meta)


class _FrozenMetadata:
    """Hashable, value-compared view of a metadata dict (pytree aux data, GraphDef entries)."""

    __slots__ = ("mapping", "_hash", "plain")

    def __init__(self, mapping: dict[str, Any]):
        self.mapping = mapping
        self._hash: int | None = None
        self.plain = _meta_plain(mapping)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _FrozenMetadata):
            return NotImplemented
        a, b = self.mapping, other.mapping
        if a is b:
            return True
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            if v is w:
                continue
            try:
                if not bool(v == w):
                    return False
            except Exception:
                return False
        return True

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            items = []
            for k, v in sorted(self.mapping.items()):
                try:
                    items.append((k, hash(v)))
                except TypeError:
                    items.append((k, repr(v)))
            h = self._hash = hash(tuple(items))
        return h

    def __repr__(self) -> str:
        return repr(self.mapping)


class VariableMetadata(Generic[A]):
    """A raw value plus metadata (and hooks), produced by initializers wrapped with
    :func:`with_metadata`.

    A Variable constructed from it takes the value and merges the metadata into its own; the
    hooks become its ``on_*`` metadata entries (unless the constructor was given its own).

    Args:
      raw_value: the value.
      metadata: metadata entries.
      on_set_value, on_get_value, on_create_value, on_add_axis, on_remove_axis: hooks
        (deprecated: subclass the Variable type and override its methods instead).

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> p = nnx.Param(nnx.VariableMetadata(jnp.zeros(2), {"tag": "w"}))
      >>> p.tag
      'w'
    """

    __slots__ = ("raw_value", "metadata", *_HOOK_KEYS)

    def __init__(
        self,
        raw_value: A,
        metadata: Mapping[str, Any] | None = None,
        *,
        on_set_value: Any = (),
        on_get_value: Any = (),
        on_create_value: Any = (),
        on_add_axis: Any = (),
        on_remove_axis: Any = (),
    ):
        self.raw_value = raw_value
        self.metadata = dict(metadata or {})
        self.on_set_value = _as_hooks(on_set_value)
        self.on_get_value = _as_hooks(on_get_value)
        self.on_create_value = _as_hooks(on_create_value)
        self.on_add_axis = _as_hooks(on_add_axis)
        self.on_remove_axis = _as_hooks(on_remove_axis)

    def __repr__(self) -> str:
        hooks = "".join(f", {k}={getattr(self, k)!r}" for k in _HOOK_KEYS if getattr(self, k))
        return f"VariableMetadata(raw_value={self.raw_value!r}, metadata={self.metadata!r}{hooks})"


def _size_bytes(value: Any) -> tuple[int, int] | None:
    leaves = jax.tree.leaves(value)
    size = nbytes = 0
    found = False
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        found = True
        n = int(np.prod(shape)) if len(shape) else 1
        size += n
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:  # extended dtypes such as PRNG keys
            itemsize = getattr(dtype, "itemsize", 8)
        nbytes += n * itemsize
    return (size, nbytes) if found else None


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _indent(text: str, prefix: str) -> str:
    return text.replace("\n", "\n" + prefix)


def _mode_error(var: Variable, key: str, value: Any) -> ValueError:
    return ValueError(
        f"Cannot change the {key!r} mode of {type(var).__name__} through its metadata (it is "
        f"{var._var_metadata.get(key, False)}, got {value!r}): make a new Variable with "
        f"var.copy({key}={value!r}) or nnx.with_vars(node, {key}={value!r})."
    )


class Variable(Generic[A]):
    """A mutable box around one value with metadata; the unit of state in refax.

    Args:
      value: the initial value (array, scalar or any pytree). A :class:`VariableMetadata`
        contributes its metadata and hooks too.
      hijax: keep the value in private JAX references, so the Variable can be mutated inside
        plain JAX transforms (default: ``nnx.var_defaults().hijax``).
      ref: keep the value in a ``jax.Ref`` handed out as the raw value (default:
        ``nnx.var_defaults().ref``).
      **metadata: arbitrary metadata, readable and settable as attributes
        (``v.out_sharding``) or through ``get_metadata``/``set_metadata``; ``on_get_value``
        and the other hook names install hooks (deprecated).

    Raises:
      ValueError: ``value`` contains a ``jax.Ref`` (pass the array and ``ref=True``), or a
        mode is given twice with different values.
      TypeError: metadata listed in the type's ``required_metadata`` is missing.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Count(nnx.Variable): pass
      >>> c = Count(jnp.array(0))
      >>> c += 1
      >>> c
      Count( # 1 (4 B)
        value=Array(1, dtype=int32, weak_type=True)
      )
    """

    __slots__ = (
        "_raw_value",
        "_var_metadata",
        "_trace_state",
        "_frozen",
        "_special",
        "__weakref__",
    )
    #: Metadata every instance must carry (checked at construction; the modes are always set).
    required_metadata: ClassVar[frozenset[str]] = frozenset(_DEFAULT_METADATA)
    # Per-class facts computed in ``__init_subclass__``.
    _class_hooks: ClassVar[dict[str, tuple[Callable[..., Any], ...]]] = {}
    _plain_class: ClassVar[bool] = True
    _custom_create: ClassVar[bool] = False

    _raw_value: A
    _var_metadata: dict[str, Any]
    _special: _Special | None

    def __init__(
        self,
        value: A | VariableMetadata[A],
        *,
        hijax: bool | None = None,
        ref: bool | None = None,
        **metadata: Any,
    ):
        meta = dict(_DEFAULT_METADATA)
        if isinstance(value, VariableMetadata):
            extra = dict(value.metadata)
            for key, given in (("hijax", hijax), ("ref", ref)):
                if key in extra:
                    mode = extra.pop(key)
                    if given is not None and given != mode:
                        raise ValueError(
                            f"{type(self).__name__}: {key}={given!r} was given to the "
                            f"constructor but the VariableMetadata says {key}={mode!r}."
                        )
                    if key == "hijax":
                        hijax = mode
                    else:
                        ref = mode
            for key, val in extra.items():
                meta[_METADATA_ALIASES.get(key, key)] = val
            for key in _HOOK_KEYS:
                hooks = getattr(value, key)
                if hooks and key not in metadata:
                    meta[key] = hooks
            value = value.raw_value
        if metadata:
            if not _HOOK_SET.isdisjoint(metadata):
                warnings.warn(
                    "Variable hooks are deprecated: subclass the Variable type and override "
                    "get_value / set_value / create_value / add_axis / remove_axis instead.",
                    DeprecationWarning,
                    stacklevel=2,
                )
            for key, val in metadata.items():
                meta[_METADATA_ALIASES.get(key, key)] = val
        if hijax is None or ref is None:
            default_hijax, default_ref = default_modes()
            hijax = default_hijax if hijax is None else hijax
            ref = default_ref if ref is None else ref
        meta["hijax"], meta["ref"] = hijax, ref
        missing = self.required_metadata - meta.keys()
        if missing:
            raise TypeError(
                f"{type(self).__name__} requires metadata {sorted(missing)}; pass them as "
                f"keyword arguments, e.g. {type(self).__name__}(value, "
                f"{sorted(missing)[0]}=...)."
            )
        if _refs.has_refs(value):
            raise ValueError(
                f"Cannot pass a jax.Ref as the value of {type(self).__name__}: pass the array "
                f"itself with ref=True ({type(self).__name__}(x, ref=True)) and the Variable "
                "makes its own reference."
            )
        _set_raw(self, value)
        _set_meta(self, meta)
        _set_trace(self, current_trace())
        _set_frozen(self, None)
        sp = self._special
        if sp is not None and sp.create:
            for hook in sp.create:
                value = hook(self, value)
            _set_raw(self, value)
        if self._custom_create:
            _set_raw(self, self.create_value(value))
        if "out_sharding" in meta:  # eager sharding (refax._sharding)
            raw = self._raw_value
            sharded, resolved = shard_new_value(raw, meta, "eager_sharding" in metadata)
            if resolved is not None:
                _set_meta(self, resolved)
            if sharded is not raw:
                _set_raw(self, sharded)
        if sp is not None and sp.refs:
            _set_raw(self, _refs.to_refs(self._raw_value))

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def _from_parts(cls, value: Any, metadata: dict[str, Any], frozen: Any = None) -> Variable:
        """Builds a Variable without running ``__init__`` (used by merge and unflatten).

        ``metadata`` is shared, never copied: every metadata change replaces the dict. The
        value is taken as it is (no hooks run, no references made).
        """
        v = object.__new__(cls)
        _set_raw(v, value)
        _set_meta_slot(v, metadata)
        _set_trace(v, current_trace())
        _set_frozen(v, frozen)
        plain = frozen.plain if frozen is not None else _meta_plain(metadata)
        _set_special(v, None if plain and cls._plain_class else _Special(cls, metadata))
        return v

    @classmethod
    def from_metadata(cls, value: Any, metadata: Mapping[str, Any]) -> Variable:
        """Creates a Variable of this type with exactly the given metadata.

        No hooks run; with ``ref`` or ``hijax`` set in ``metadata`` the value is moved into
        new JAX references (unless it holds references already).

        Example:
          >>> from refax import nnx
          >>> p = nnx.Param.from_metadata(1.0, {"tag": "w", "hijax": False, "ref": False})
          >>> type(p).__name__, p.tag
          ('Param', 'w')
        """
        v = cls._from_parts(value, dict(metadata))
        sp = v._special
        if sp is not None and sp.refs and not _refs.has_refs(value):
            _set_raw(v, _refs.to_refs(value))
        return v

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _classify(cls)
        _register_pytree(cls)

    # -- value access -----------------------------------------------------------------------
    def _check_trace(self) -> None:
        ts = self._trace_state
        cur = current_trace()
        if ts is not cur and ts != cur:
            raise TraceContextError.for_variable(self)

    def _check_writable(self) -> None:
        """The trace check of a value write: skipped when the write goes into JAX references,
        which JAX itself checks."""
        sp = self._special
        if sp is None or not (sp.refs and _refs.has_refs(self._raw_value)):
            self._check_trace()

    def get_value(self, index: Any = _MISSING) -> A:
        """Returns the value (or ``value[index]`` when an index is given).

        Subclasses may override it; ``v[...]``, ``v.value``, the operators and every other
        read go through it then.
        """
        sp = self._special
        if sp is None:
            if index is _MISSING or index is Ellipsis:
                return self._raw_value
            return self._raw_value[index]  # type: ignore[index]
        raw = self._raw_value
        if sp.refs and _refs.has_refs(raw):
            if index is _MISSING or index is Ellipsis:
                value = _refs.read(raw)
            else:
                value = _refs.read_at(raw, index)
        elif index is _MISSING or index is Ellipsis:
            value = raw
        else:
            value = raw[index]  # type: ignore[index]
        for hook in sp.get:
            value = hook(self, value)
        return value

    def set_value(self, value: Any, *, index: Any = _MISSING) -> None:
        """Replaces the value in place (or ``value[index]`` when an index is given).

        Subclasses may override it; ``v[...] = x``, ``v.value = x`` and the in-place
        operators go through it then.
        """
        sp = self._special
        if sp is None:
            self._check_trace()
            if isinstance(value, Variable):
                value = value._raw_value if value._special is None else value.get_value()
            if index is not _MISSING:
                self._raw_value = _set_at(self._raw_value, index, value)  # type: ignore[assignment]
                return
            _set_raw(self, value)
            return
        if isinstance(value, Variable):
            value = value.get_value()
        for hook in sp.set:
            value = hook(self, value)
        self._store(value, index)

    def _store(self, value: Any, index: Any) -> None:
        """Writes ``value`` (at ``index``) into the storage: the references, or the box."""
        raw = self._raw_value
        sp = self._special
        if sp is not None and sp.refs and _refs.has_refs(raw):
            if _refs.write(raw, _refs.WHOLE if index is _MISSING else index, value):
                return
            if not (sp.hijax and _refs.concrete(raw)):
                raise self._ref_write_error(raw, index, value)
            self._check_trace()
            new = value if index is _MISSING else _set_at(_refs.read(raw), index, value)
            _set_raw(self, _refs.to_refs(new))
            return
        self._check_trace()
        if index is _MISSING or (index is Ellipsis and np.shape(value) == np.shape(raw)):
            _set_raw(self, value)
        else:
            _set_raw(self, _set_at(raw, index, value))

    def _ref_write_error(self, raw: Any, index: Any, value: Any) -> ValueError:
        name = type(self).__name__
        where = "" if index is _MISSING or index is Ellipsis else f" at index {index!r}"
        got = f"shape {np.shape(value)} and dtype {getattr(value, 'dtype', type(value).__name__)}"
        if isinstance(raw, _Ref):
            have = f"a jax.Ref of shape {tuple(raw.shape)} and dtype {raw.dtype}"
        else:
            have = f"JAX references of structure {jax.tree.structure(raw)}"
        if self.hijax:
            reason = "inside a JAX transform its references cannot be replaced"
        else:
            reason = "a reference never changes shape, dtype or structure (ref=True)"
        return ValueError(
            f"Cannot write a value of {got}{where} into {name}: it holds {have}, and {reason}. "
            f"Write a value that matches, or make a new Variable: var.copy(value=...)."
        )

    @property
    def value(self) -> A:
        """The held value; assigning to it updates the Variable in place."""
        if self._special is None:
            return self._raw_value
        return self.get_value()

    @value.setter
    def value(self, value: Any) -> None:
        self.set_value(value)

    def get_raw_value(self) -> A:
        """The stored value, without hooks: a ``jax.Ref`` (pytree of them) with ``ref=True``;
        plain arrays otherwise (a ``hijax`` Variable's references are private)."""
        sp = self._special
        if sp is not None and sp.hijax and not self._var_metadata.get("ref"):
            return _refs.read(self._raw_value)
        return self._raw_value

    def set_raw_value(self, value: Any) -> None:
        """Replaces the stored value, without hooks (a ``jax.Ref`` given to a ``ref=True``
        Variable becomes its reference; other values are written into its references)."""
        sp = self._special
        if (
            sp is None
            or not sp.refs
            or isinstance(value, _Ref)
            or not _refs.has_refs(self._raw_value)
        ):
            self._check_trace()
            _set_raw(self, value)
            return
        self._store(value, _MISSING)

    @property
    def raw_value(self) -> A:
        """Deprecated spelling of :meth:`get_raw_value` / :meth:`set_raw_value`."""
        return self.get_raw_value()

    @raw_value.setter
    def raw_value(self, value: Any) -> None:
        self.set_raw_value(value)

    def create_value(self, value: Any) -> Any:
        """Override to transform the value once, when the Variable is constructed."""
        return value

    def __getitem__(self, key: Any) -> Any:
        if self._special is None:
            if key is Ellipsis:
                return self._raw_value
            return self._raw_value[key]  # type: ignore[index]
        return self.get_value(index=key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._special is not None:
            self.set_value(value, index=key)
            return
        self._check_trace()
        if isinstance(value, Variable):
            value = value._raw_value if value._special is None else value.get_value()
        if key is Ellipsis and np.shape(value) == np.shape(self._raw_value):
            _set_raw(self, value)
        else:
            _set_raw(self, _set_at(self._raw_value, key, value))

    def __delitem__(self, key: Any) -> None:
        value = self.get_value()
        del value[key]  # type: ignore[attr-defined]
        self.set_value(value)

    # -- transform axes -----------------------------------------------------------------------
    def add_axis(self, axis_index: int, axis_name: str | None) -> None:
        """Called when a transform (``vmap``, ``scan``, ...) adds a mapped axis to the value.

        Transforms call it when given ``transform_metadata={nnx.PARTITION_NAME: name}``, after
        they updated the sharding metadata. Runs the ``on_add_axis`` hooks; override it to keep
        axis-dependent metadata right.
        """
        sp = self._special
        if sp is not None:
            for hook in sp.add_axis:
                hook(self, axis_index, axis_name)

    def remove_axis(self, axis_index: int, axis_name: str | None) -> None:
        """Called when a transform removes a mapped axis from the value (see ``add_axis``)."""
        sp = self._special
        if sp is not None:
            for hook in sp.remove_axis:
                hook(self, axis_index, axis_name)

    # -- metadata ----------------------------------------------------------------------------
    def get_metadata(
        self,
        name: str | None = None,
        default: Any = _MISSING,
        *,
        exclude_required: bool | None = None,
    ) -> Any:
        """Returns the metadata dict (a copy) or one entry of it.

        Args:
          name: the entry to return; ``None`` for a copy of the whole dict.
          default: returned when ``name`` is missing (otherwise KeyError).
          exclude_required: with no ``name``, leave out the ``required_metadata`` entries
            (the modes ``hijax``, ``ref`` and ``eager_sharding`` for plain Variables).

        Example:
          >>> from refax import nnx
          >>> p = nnx.Param(1.0, tag="w")
          >>> p.get_metadata("tag"), p.get_metadata("other", None)
          ('w', None)
          >>> p.get_metadata(exclude_required=True)
          {'tag': 'w'}
        """
        if name is None:
            if default is not _MISSING:
                raise TypeError("get_metadata: a default needs a name.")
            meta = dict(self._var_metadata)
            if exclude_required:
                for key in self.required_metadata:
                    meta.pop(key, None)
            return meta
        if exclude_required is not None:
            raise TypeError("get_metadata: give either a name or exclude_required, not both.")
        key = _METADATA_ALIASES.get(name, name)
        if key in self._var_metadata:
            return self._var_metadata[key]
        if default is _MISSING:
            raise KeyError(f"{type(self).__name__} has no metadata {name!r}")
        return default

    def set_metadata(self, *args: Any, **kwargs: Any) -> None:
        """Sets metadata: ``set_metadata(mapping)``, ``set_metadata(name, value)`` or ``**kw``.

        A mapping replaces the whole metadata dict (the ``hijax`` / ``ref`` modes are kept);
        the other forms update entries. The modes themselves cannot change this way.

        Raises:
          ValueError: an attempt to change ``hijax`` or ``ref``.
          TypeError: any other combination of arguments.
        """
        self._check_trace()
        old = self._var_metadata
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            new = {_METADATA_ALIASES.get(k, k): v for k, v in args[0].items()}
            for key in _MODES:
                if key not in new:
                    if old.get(key):
                        new[key] = old[key]
                elif bool(new[key]) != bool(old.get(key)):
                    raise _mode_error(self, key, new[key])
        elif len(args) == 2 and not kwargs:
            key = _METADATA_ALIASES.get(args[0], args[0])
            if key in _MODES and bool(args[1]) != bool(old.get(key)):
                raise _mode_error(self, key, args[1])
            new = {**old, key: args[1]}
        elif not args and kwargs:
            new = dict(old)
            for key, val in kwargs.items():
                key = _METADATA_ALIASES.get(key, key)
                if key in _MODES and bool(val) != bool(old.get(key)):
                    raise _mode_error(self, key, val)
                new[key] = val
        else:
            raise TypeError(
                "set_metadata takes a mapping, a (name, value) pair or keyword arguments; "
                f"got {len(args)} positional and {len(kwargs)} keyword arguments."
            )
        _set_meta(self, new)
        _set_frozen(self, None)
        bump_epoch()

    def has_metadata(self, name: str) -> bool:
        """True when the metadata has an entry ``name``."""
        return _METADATA_ALIASES.get(name, name) in self._var_metadata

    def del_metadata(self, name: str) -> None:
        """Removes the metadata entry ``name`` (the ``hijax`` / ``ref`` modes cannot go)."""
        self._check_trace()
        key = _METADATA_ALIASES.get(name, name)
        if key in _MODES:
            raise ValueError(
                f"Cannot delete the {key!r} mode of {type(self).__name__}: make a new Variable "
                f"with var.copy({key}=False) instead."
            )
        new = dict(self._var_metadata)
        del new[key]
        _set_meta(self, new)
        _set_frozen(self, None)
        bump_epoch()

    def _frozen_metadata(self) -> _FrozenMetadata:
        frozen = self._frozen
        if frozen is None:
            frozen = _FrozenMetadata(self._var_metadata)
            _set_frozen(self, frozen)
        return frozen

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: metadata first, then the value's attributes.
        if name in _INTERNAL or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        meta = self._var_metadata
        if name in meta:  # ``v.sharding`` is the value's sharding, never the metadata alias
            return meta[name]
        try:
            return getattr(self._raw_value if self._special is None else self.get_value(), name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} has no metadata or value attribute {name!r}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL:
            if name == "_var_metadata":
                _set_meta(self, value)
            else:
                object.__setattr__(self, name, value)
        elif name == "__class__":  # a new Variable type: cached graph walks must see it
            object.__setattr__(self, name, value)
            _set_meta(self, self._var_metadata)  # its hooks and overrides may differ
            bump_epoch()
        elif isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            self.set_metadata(name, value)

    def __delattr__(self, name: str) -> None:
        if name in _INTERNAL:
            object.__delattr__(self, name)
        else:
            self.del_metadata(name)

    # -- introspection ----------------------------------------------------------------------
    @property
    def type(self) -> type[Variable]:
        return type(self)

    @property
    def var_type(self) -> type[Variable]:
        return type(self)

    def _shaped(self) -> Any:
        """The stored value, or something with its shape and dtype (a reference)."""
        raw = self._raw_value
        if self._special is None or isinstance(raw, _Ref):
            return raw
        return self.get_value()

    @property
    def shape(self) -> tuple[int, ...]:
        x = self._shaped()
        return tuple(x.shape) if isinstance(x, _Ref) else np.shape(x)

    @property
    def dtype(self) -> Any:
        x = self._shaped()
        return getattr(x, "dtype", None) or np.asarray(x).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def hijax(self) -> bool:
        """True when the value lives in private JAX references (see :func:`var_defaults`)."""
        return bool(self._var_metadata.get("hijax", False))

    @property
    def ref(self) -> bool:
        """True when the value lives in a ``jax.Ref`` handed out as the raw value."""
        return bool(self._var_metadata.get("ref", False))

    @property
    def sharding_names(self) -> Any:
        """Deprecated name of the ``out_sharding`` metadata (``None`` when absent)."""
        return self._var_metadata.get("out_sharding")

    @sharding_names.setter
    def sharding_names(self, value: Any) -> None:
        self.set_metadata("out_sharding", value)

    # -- copying ----------------------------------------------------------------------------
    def copy(self, value: Any = _MISSING, **updates: Any) -> Variable[A]:
        """Returns a new Variable of the same type with the same (or a new) value and metadata.

        ``updates`` change metadata entries, including the modes: ``copy(ref=True)``,
        ``copy(hijax=False)``. The new Variable shares the value's array buffers but never
        its JAX references (a new reference is made when a mode asks for one).

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from refax import nnx
          >>> v = nnx.Param(jnp.zeros(2), tag="w")
          >>> r = v.copy(ref=True)
          >>> isinstance(r.get_raw_value(), jax.Ref), r.tag, v.ref
          (True, 'w', False)
          >>> v.copy(jnp.ones(3)).shape
          (3,)
        """
        if "value" in updates:
            value = updates.pop("value")
        meta = dict(self._var_metadata)
        for key, val in updates.items():
            meta[_METADATA_ALIASES.get(key, key)] = val
        if value is _MISSING:
            value = self._raw_value
            if self._special is not None and _refs.has_refs(value):
                value = _refs.read(value)
        new = type(self)._from_parts(value, meta)
        sp = new._special
        if sp is not None and sp.refs:
            _set_raw(new, _refs.to_refs(new._raw_value))
        return new

    def replace(self, value: Any = _MISSING, **metadata: Any) -> Variable[A]:
        """Same as :meth:`copy`: a new Variable with a new value and/or metadata."""
        return self.copy(value, **metadata)

    def to_state(self, value: Any = _MISSING, **updates: Any) -> Variable[A]:
        """Same as :meth:`copy` (kept for code written against the older State API)."""
        return self.copy(value, **updates)

    def copy_from(self, other: Variable[A]) -> None:
        """Copies value and metadata of ``other`` into this Variable (its modes stay)."""
        if other is self:
            return
        self._check_trace()
        meta = other._var_metadata
        if meta != self._var_metadata:
            new = dict(meta)
            for key in _MODES:
                if key in self._var_metadata:
                    new[key] = self._var_metadata[key]
                else:
                    new.pop(key, None)
            _set_meta(self, new)
            _set_frozen(self, None)
            bump_epoch()
        value = other._raw_value
        if other._special is not None and _refs.has_refs(value):
            value = _refs.read(value)
        if self._special is not None and self._special.refs:
            if _refs.has_refs(self._raw_value):
                self._store(value, _MISSING)
            else:
                _set_raw(self, _refs.to_refs(value))
        else:
            _set_raw(self, value)

    update_from_state = copy_from

    def __copy__(self) -> Variable[A]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Variable[A]:
        new = type(self)._from_parts(
            _copy.deepcopy(self._raw_value, memo), _copy.deepcopy(self._var_metadata, memo)
        )
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"value": self._raw_value, "metadata": self._var_metadata}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _set_raw(self, state["value"])
        _set_meta(self, state["metadata"])
        _set_trace(self, current_trace())
        _set_frozen(self, None)

    def __reduce__(self):
        return (_rebuild_variable, (type(self), self._raw_value, self._var_metadata))

    # -- array protocol -----------------------------------------------------------------------
    def __jax_array__(self) -> jax.Array:
        return jnp.asarray(_val(self))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(_val(self), dtype=dtype)

    def __len__(self) -> int:
        return len(_val(self))

    def __iter__(self):
        return iter(_val(self))

    def __contains__(self, item: Any) -> bool:
        return item in _val(self)

    def __bool__(self) -> bool:
        return bool(_val(self))

    def __int__(self) -> int:
        return int(_val(self))

    def __float__(self) -> float:
        return float(_val(self))

    def __complex__(self) -> complex:
        return complex(_val(self))

    def __index__(self) -> int:
        return operator.index(_val(self))

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(_val(self), ndigits)

    def __trunc__(self) -> Any:
        return math.trunc(_val(self))

    def __floor__(self) -> Any:
        return math.floor(_val(self))

    def __ceil__(self) -> Any:
        return math.ceil(_val(self))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _val(self)(*args, **kwargs)

    __hash__ = None  # type: ignore[assignment]

    # -- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        name = type(self).__name__
        value = _val(self)
        info = _size_bytes(value)
        head = f"{name}("
        if info is not None:
            head += f" # {info[0]:,} ({_human_bytes(info[1])})"
        lines = [f"  value={_indent(repr(value), '  ')}"]
        for key, val in self._var_metadata.items():
            if key in _DEFAULT_METADATA and val == _DEFAULT_METADATA[key]:
                continue
            lines.append(f"  {key}={_indent(repr(val), '  ')}")
        return head + "\n" + ",\n".join(lines) + "\n)"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return DISPLAY.treescope_variable(self, path, subtree_renderer)


def _val(v: Variable) -> Any:
    """The value as reads see it (the fast path when the Variable is plain)."""
    return v._raw_value if v._special is None else v.get_value()


def _classify(cls: type[Variable]) -> None:
    """Records what a Variable type customises (hooks, overridden accessors)."""
    cls._class_hooks = {
        k: (getattr(cls, k),) for k in _HOOK_KEYS if callable(getattr(cls, k, None))
    }
    cls._plain_class = (
        not cls._class_hooks
        and cls.get_value is Variable.get_value
        and cls.set_value is Variable.set_value
    )
    cls._custom_create = cls.create_value is not Variable.create_value


class _HijaxMeta(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, Variable) and instance.hijax

    def __subclasscheck__(cls, subclass: type) -> bool:
        return subclass is cls


class HijaxVariable(metaclass=_HijaxMeta):
    """The kind of a Variable in ``hijax`` mode: ``isinstance(v, HijaxVariable)`` is ``v.hijax``.

    refax keeps a hijax Variable's own type (a hijax ``Param`` is a ``Param``, so type
    filters keep working); this class only answers ``isinstance``.

    Example:
      >>> from refax import nnx
      >>> from refax.nnx import variablelib
      >>> isinstance(nnx.Param(1.0, hijax=True), variablelib.HijaxVariable)
      True
      >>> isinstance(nnx.Param(1.0), variablelib.HijaxVariable)
      False
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "HijaxVariable is not instantiated: create a Variable with hijax=True, e.g. "
            "nnx.Param(x, hijax=True), or convert one with nnx.with_vars(node, hijax=True)."
        )


def _rebuild_variable(cls: type[Variable], value: Any, metadata: dict[str, Any]) -> Variable:
    return cls._from_parts(value, metadata)


_set_raw = Variable._raw_value.__set__  # type: ignore[attr-defined]
_set_meta_slot = Variable._var_metadata.__set__  # type: ignore[attr-defined]
_set_trace = Variable._trace_state.__set__  # type: ignore[attr-defined]
_set_frozen = Variable._frozen.__set__  # type: ignore[attr-defined]
_set_special = Variable._special.__set__  # type: ignore[attr-defined]


def _set_meta(v: Variable, meta: dict[str, Any]) -> None:
    """Replaces the metadata dict and recomputes what the Variable does beyond storage."""
    _set_meta_slot(v, meta)
    _set_special(v, _special_for(type(v), meta))


def _set_at(container: Any, index: Any, value: Any) -> Any:
    if isinstance(container, jax.Array):
        return container.at[index].set(value)
    if isinstance(container, np.ndarray):
        out = container.copy()
        out[index] = value
        return out
    container[index] = value
    return container


# -- operators: forwarded to the value; in-place forms update the Variable -----------------
def _binary(op: Callable[[Any, Any], Any]) -> tuple[Callable, Callable]:
    def forward(self: Variable, other: Any) -> Any:
        if isinstance(other, Variable):
            other = _val(other)
        return op(self._raw_value if self._special is None else self.get_value(), other)

    def reflected(self: Variable, other: Any) -> Any:
        return op(other, self._raw_value if self._special is None else self.get_value())

    return forward, reflected


for _name, _op in {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "matmul": operator.matmul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "divmod": divmod,
    "pow": pow,
    "lshift": operator.lshift,
    "rshift": operator.rshift,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
}.items():
    _fwd, _refl = _binary(_op)
    _fwd.__name__, _refl.__name__ = f"__{_name}__", f"__r{_name}__"
    setattr(Variable, f"__{_name}__", _fwd)
    setattr(Variable, f"__r{_name}__", _refl)
    if _name != "divmod":

        def _inplace(self: Variable, other: Any, _op: Callable = _op) -> Variable:
            if isinstance(other, Variable):
                other = _val(other)
            self.set_value(_op(_val(self), other))
            return self

        _inplace.__name__ = f"__i{_name}__"
        setattr(Variable, f"__i{_name}__", _inplace)

for _name, _op in {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}.items():
    setattr(Variable, f"__{_name}__", _binary(_op)[0])

for _name, _op in {
    "neg": operator.neg,
    "pos": operator.pos,
    "abs": abs,
    "invert": operator.invert,
}.items():

    def _unary(self: Variable, _op: Callable = _op) -> Any:
        return _op(_val(self))

    _unary.__name__ = f"__{_name}__"
    setattr(Variable, f"__{_name}__", _unary)
Variable.__hash__ = None  # type: ignore[assignment]  # restored after __eq__ was set


# -- pytree registration ------------------------------------------------------------------
_VALUE_KEY = jax.tree_util.GetAttrKey("value")


def _register_pytree(cls: type[Variable]) -> None:
    def flatten_with_keys(v: Variable):
        return ((_VALUE_KEY, v._raw_value),), v._frozen_metadata()

    def flatten(v: Variable):
        return (v._raw_value,), v._frozen_metadata()

    def unflatten(aux: _FrozenMetadata, children: Any) -> Variable:
        return cls._from_parts(children[0], aux.mapping, aux)

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)


_classify(Variable)
_register_pytree(Variable)


class Param(Variable[A]):
    """Trainable weights: the default target of gradients and optimizers."""

    __slots__ = ()


class BatchStat(Variable[A]):
    """Running statistics, e.g. BatchNorm's mean and variance."""

    __slots__ = ()


class Cache(Variable[A]):
    """Autoregressive decoding caches."""

    __slots__ = ()


class Intermediate(Variable[A]):
    """Intermediate values recorded by ``Module.sow``."""

    __slots__ = ()


class Perturbation(Intermediate[A]):
    """Zero perturbations added by ``Module.perturb`` to take gradients of intermediates."""

    __slots__ = ()


def with_metadata(
    initializer: Callable[..., Any],
    on_set_value: Any = (),
    on_get_value: Any = (),
    on_create_value: Any = (),
    on_add_axis: Any = (),
    on_remove_axis: Any = (),
    **metadata: Any,
) -> Callable[..., VariableMetadata]:
    """Wraps an initializer so the Variable built from its output carries ``metadata``.

    Args:
      initializer: any function returning the value (or a :class:`VariableMetadata`, whose
        metadata and hooks are kept; the new ones win / run after).
      on_set_value, on_get_value, on_create_value, on_add_axis, on_remove_axis: hooks, a
        callable or a sequence of them (deprecated: subclass the Variable type and override
        ``set_value`` / ``get_value`` / ``create_value`` / ``add_axis`` / ``remove_axis``).
      **metadata: metadata entries.

    Returns:
      The wrapped initializer; it returns a :class:`VariableMetadata`.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> init = nnx.with_metadata(jax.nn.initializers.ones, out_sharding=("x",))
      >>> nnx.Param(init(jax.random.key(0), (2,))).out_sharding
      ('x',)
    """
    meta = {_METADATA_ALIASES.get(k, k): v for k, v in metadata.items()}
    hooks = {
        "on_set_value": _as_hooks(on_set_value),
        "on_get_value": _as_hooks(on_get_value),
        "on_create_value": _as_hooks(on_create_value),
        "on_add_axis": _as_hooks(on_add_axis),
        "on_remove_axis": _as_hooks(on_remove_axis),
    }
    if any(hooks.values()):
        warnings.warn(
            "Variable hooks are deprecated: subclass the Variable type and override "
            "get_value / set_value / create_value / add_axis / remove_axis instead.",
            DeprecationWarning,
            stacklevel=2,
        )

    def wrapped(*args: Any, **kwargs: Any) -> VariableMetadata:
        value = initializer(*args, **kwargs)
        if isinstance(value, VariableMetadata):
            inner = {k: getattr(value, k) + hooks[k] for k in _HOOK_KEYS}
            return VariableMetadata(value.raw_value, {**value.metadata, **meta}, **inner)
        return VariableMetadata(value, meta, **hooks)

    wrapped.__wrapped__ = initializer  # type: ignore[attr-defined]
    return wrapped


# -- collection names (the Linen convention) -----------------------------------------------
_NAME_TO_TYPE: dict[str, type[Variable]] = {
    "params": Param,
    "batch_stats": BatchStat,
    "cache": Cache,
    "intermediates": Intermediate,
    "perturbations": Perturbation,
}
_TYPE_TO_NAME: dict[type[Variable], str] = {v: k for k, v in _NAME_TO_TYPE.items()}


def register_variable_name(name: str, typ: type[Variable] | None = None, *, overwrite=False):
    """Registers a collection name <-> Variable type pair; usable as a class decorator.

    Example:
      >>> from refax import nnx
      >>> @nnx.register_variable_name("refax_doc_counts")
      ... class Counts(nnx.Variable): pass
      >>> nnx.variable_type_from_name("refax_doc_counts") is Counts
      True
    """
    if typ is None:
        return lambda t: register_variable_name(name, t, overwrite=overwrite)
    if name in _NAME_TO_TYPE and _NAME_TO_TYPE[name] is not typ and not overwrite:
        raise ValueError(
            f"Variable name {name!r} is already registered to {_NAME_TO_TYPE[name].__name__}; "
            "pass overwrite=True to replace it."
        )
    _NAME_TO_TYPE[name] = typ
    _TYPE_TO_NAME[typ] = name
    return typ


def variable_type_from_name(
    name: str, /, *, base: type[Variable] = Variable, allow_register: bool = False
) -> type[Variable]:
    """Maps a collection name to its Variable type.

    Args:
      name: a Linen-style collection name (``'params'``, ``'batch_stats'``, ...).
      base: the base class of a type created for an unknown name.
      allow_register: create (and register) a new type for an unknown name instead of
        raising ValueError.

    Example:
      >>> from refax import nnx
      >>> nnx.variable_type_from_name("params") is nnx.Param
      True
    """
    if name in _NAME_TO_TYPE:
        return _NAME_TO_TYPE[name]
    if not allow_register:
        raise ValueError(
            f"No Variable type registered for name {name!r}; register one with "
            "register_variable_name or pass allow_register=True."
        )
    typ = type(name, (base,), {"__slots__": ()})
    return register_variable_name(name, typ)


def variable_name_from_type(typ: type[Variable], /, *, allow_register: bool = False) -> str:
    """Inverse of :func:`variable_type_from_name` (a subclass maps to its base's name).

    Example:
      >>> from refax import nnx
      >>> nnx.variable_name_from_type(nnx.BatchStat)
      'batch_stats'
    """
    for t in typ.__mro__:
        if t in _TYPE_TO_NAME:
            return _TYPE_TO_NAME[t]
    if not allow_register:
        raise ValueError(f"No name registered for Variable type {typ.__name__}.")
    return register_variable_name(typ.__name__, typ) and typ.__name__
