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

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> w = nnx.Param(jnp.ones((2, 3)), sharding_names=("a", None))
  >>> w.shape, w.sharding_names
  ((2, 3), ('a', None))
  >>> w[...] += 1
  >>> float(w.sum())
  12.0
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

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
    "with_metadata",
    "variable_type_from_name",
    "variable_name_from_type",
    "register_variable_name",
]

_MISSING = object()
_DEFAULT_METADATA: dict[str, Any] = {"hijax": False, "ref": False, "eager_sharding": True}
# Constructor keywords that are older spellings of a metadata key.
_METADATA_ALIASES = {"sharding_names": "out_sharding", "sharding": "out_sharding"}
_INTERNAL = frozenset({"_raw_value", "_var_metadata", "_trace_state", "_frozen"})


class _FrozenMetadata:
    """Hashable, value-compared view of a metadata dict (pytree aux data, GraphDef entries)."""

    __slots__ = ("mapping", "_hash")

    def __init__(self, mapping: dict[str, Any]):
        self.mapping = mapping
        self._hash: int | None = None

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
    """A raw value plus metadata, produced by initializers wrapped with :func:`with_metadata`.

    A Variable constructed from it takes the value and merges the metadata into its own.
    """

    __slots__ = ("raw_value", "metadata")

    def __init__(self, raw_value: A, metadata: Mapping[str, Any] | None = None):
        self.raw_value = raw_value
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"VariableMetadata(raw_value={self.raw_value!r}, metadata={self.metadata!r})"


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


class Variable(Generic[A]):
    """A mutable box around one value with metadata; the unit of state in refax.

    Args:
      value: the initial value (array, scalar or any pytree). A :class:`VariableMetadata`
        contributes its metadata too.
      **metadata: arbitrary metadata, readable and settable as attributes
        (``v.sharding_names``) or through ``get_metadata``/``set_metadata``.

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

    __slots__ = ("_raw_value", "_var_metadata", "_trace_state", "_frozen", "__weakref__")
    required_metadata: ClassVar[frozenset[str]] = frozenset()

    _raw_value: A
    _var_metadata: dict[str, Any]

    def __init__(self, value: A | VariableMetadata[A], **metadata: Any):
        meta = dict(_DEFAULT_METADATA)
        if isinstance(value, VariableMetadata):
            meta.update(value.metadata)
            value = value.raw_value
        for key, val in metadata.items():
            meta[_METADATA_ALIASES.get(key, key)] = val
        missing = self.required_metadata - meta.keys()
        if missing:
            raise TypeError(
                f"{type(self).__name__} requires metadata {sorted(missing)}; pass them as "
                f"keyword arguments, e.g. {type(self).__name__}(value, "
                f"{sorted(missing)[0]}=...)."
            )
        _set_raw(self, value)
        _set_meta(self, meta)
        _set_trace(self, current_trace())
        _set_frozen(self, None)
        if "out_sharding" in meta:  # eager sharding; lazy import (refax.spmd imports us)
            from refax.spmd import _shard_new_variable

            _shard_new_variable(self, metadata)

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def _from_parts(cls, value: Any, metadata: dict[str, Any], frozen: Any = None) -> Variable:
        """Builds a Variable without running ``__init__`` (used by merge and unflatten).

        ``metadata`` is shared, never copied: every metadata change replaces the dict.
        """
        v = object.__new__(cls)
        _set_raw(v, value)
        _set_meta(v, metadata)
        _set_trace(v, current_trace())
        _set_frozen(v, frozen)
        return v

    @classmethod
    def from_metadata(cls, value: Any, metadata: Mapping[str, Any]) -> Variable:
        """Creates a Variable of this type with exactly the given metadata."""
        return cls._from_parts(value, dict(metadata))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_pytree(cls)

    # -- value access -----------------------------------------------------------------------
    def _check_trace(self) -> None:
        ts = self._trace_state
        cur = current_trace()
        if ts is not cur and ts != cur:
            raise TraceContextError.for_object(self)

    def get_value(self, index: Any = _MISSING) -> A:
        """Returns the value (or ``value[index]`` when an index is given)."""
        if index is _MISSING or index is Ellipsis:
            return self._raw_value
        return self._raw_value[index]  # type: ignore[index]

    def set_value(self, value: Any, *, index: Any = _MISSING) -> None:
        """Replaces the value in place (or ``value[index]`` when an index is given)."""
        self._check_trace()
        if isinstance(value, Variable):
            value = value._raw_value
        if index is not _MISSING:
            self._raw_value = _set_at(self._raw_value, index, value)  # type: ignore[assignment]
            return
        _set_raw(self, value)

    @property
    def value(self) -> A:
        """The held value; assigning to it updates the Variable in place."""
        return self._raw_value

    @value.setter
    def value(self, value: Any) -> None:
        self.set_value(value)

    def get_raw_value(self) -> A:
        return self._raw_value

    def set_raw_value(self, value: Any) -> None:
        self._check_trace()
        _set_raw(self, value)

    @property
    def raw_value(self) -> A:
        return self._raw_value

    @raw_value.setter
    def raw_value(self, value: Any) -> None:
        self.set_raw_value(value)

    def create_value(self, value: Any) -> Any:
        return value

    def __getitem__(self, key: Any) -> Any:
        if key is Ellipsis:
            return self._raw_value
        return self._raw_value[key]  # type: ignore[index]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check_trace()
        if isinstance(value, Variable):
            value = value._raw_value
        if key is Ellipsis and np.shape(value) == np.shape(self._raw_value):
            _set_raw(self, value)
        else:
            _set_raw(self, _set_at(self._raw_value, key, value))

    # -- metadata ----------------------------------------------------------------------------
    def get_metadata(self, key: str | None = None, default: Any = _MISSING) -> Any:
        """Returns the metadata dict (a copy) or one entry of it."""
        if key is None:
            return dict(self._var_metadata)
        key = _METADATA_ALIASES.get(key, key)
        if key in self._var_metadata:
            return self._var_metadata[key]
        if default is _MISSING:
            raise KeyError(f"{type(self).__name__} has no metadata {key!r}")
        return default

    def set_metadata(self, *args: Any, **kwargs: Any) -> None:
        """Sets metadata: ``set_metadata(mapping)``, ``set_metadata(key, value)`` or ``**kw``.

        A mapping replaces the whole metadata dict; the other forms update entries.
        """
        self._check_trace()
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            new = dict(args[0])
        elif len(args) == 2 and not kwargs:
            new = {**self._var_metadata, _METADATA_ALIASES.get(args[0], args[0]): args[1]}
        elif not args:
            new = dict(self._var_metadata)
            for key, val in kwargs.items():
                new[_METADATA_ALIASES.get(key, key)] = val
        else:
            raise TypeError(
                "set_metadata takes a mapping, a (key, value) pair or keyword arguments; "
                f"got {len(args)} positional and {len(kwargs)} keyword arguments."
            )
        _set_meta(self, new)
        _set_frozen(self, None)
        bump_epoch()

    def has_metadata(self, key: str) -> bool:
        return _METADATA_ALIASES.get(key, key) in self._var_metadata

    def del_metadata(self, key: str) -> None:
        self._check_trace()
        key = _METADATA_ALIASES.get(key, key)
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
        key = _METADATA_ALIASES.get(name, name)
        if key in meta:
            return meta[key]
        try:
            return getattr(self._raw_value, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} has no metadata or value attribute {name!r}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL:
            object.__setattr__(self, name, value)
        elif name == "__class__":  # a new Variable type: cached graph walks must see it
            object.__setattr__(self, name, value)
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

    @property
    def shape(self) -> tuple[int, ...]:
        return np.shape(self._raw_value)

    @property
    def dtype(self) -> Any:
        return getattr(self._raw_value, "dtype", None) or np.asarray(self._raw_value).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def hijax(self) -> bool:
        return bool(self._var_metadata.get("hijax", False))

    @property
    def ref(self) -> bool:
        return bool(self._var_metadata.get("ref", False))

    # -- copying ----------------------------------------------------------------------------
    def replace(self, value: Any = _MISSING, **metadata: Any) -> Variable[A]:
        """Returns a new Variable of the same type, with a new value and/or metadata."""
        meta = dict(self._var_metadata)
        for key, val in metadata.items():
            meta[_METADATA_ALIASES.get(key, key)] = val
        return type(self)._from_parts(self._raw_value if value is _MISSING else value, meta)

    def copy(self, **_modes: Any) -> Variable[A]:
        """Returns a new Variable with the same value (buffer shared) and metadata."""
        return type(self)._from_parts(self._raw_value, dict(self._var_metadata))

    def to_state(self) -> Variable[A]:
        return self.copy()

    def copy_from(self, other: Variable[A]) -> None:
        """Copies value and metadata of ``other`` into this Variable."""
        self._check_trace()
        _set_raw(self, other._raw_value)
        if other._var_metadata != self._var_metadata:
            _set_meta(self, dict(other._var_metadata))
            _set_frozen(self, None)
            bump_epoch()

    update_from_state = copy_from

    def __copy__(self) -> Variable[A]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Variable[A]:
        import copy as _copy

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
        return jnp.asarray(self._raw_value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self._raw_value, dtype=dtype)

    def __len__(self) -> int:
        return len(self._raw_value)  # type: ignore[arg-type]

    def __iter__(self):
        return iter(self._raw_value)  # type: ignore[call-overload]

    def __bool__(self) -> bool:
        return bool(self._raw_value)

    def __int__(self) -> int:
        return int(self._raw_value)  # type: ignore[call-overload]

    def __float__(self) -> float:
        return float(self._raw_value)  # type: ignore[arg-type]

    def __index__(self) -> int:
        return operator.index(self._raw_value)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._raw_value(*args, **kwargs)  # type: ignore[operator]

    __hash__ = None  # type: ignore[assignment]

    # -- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        name = type(self).__name__
        info = _size_bytes(self._raw_value)
        head = f"{name}("
        if info is not None:
            head += f" # {info[0]:,} ({_human_bytes(info[1])})"
        lines = [f"  value={_indent(repr(self._raw_value), '  ')}"]
        for key, val in self._var_metadata.items():
            if key in _DEFAULT_METADATA and val == _DEFAULT_METADATA[key]:
                continue
            lines.append(f"  {key}={_indent(repr(val), '  ')}")
        return head + "\n" + ",\n".join(lines) + "\n)"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from refax._display import treescope_variable

        return treescope_variable(self, path, subtree_renderer)


def _rebuild_variable(cls: type[Variable], value: Any, metadata: dict[str, Any]) -> Variable:
    return cls._from_parts(value, metadata)


_set_raw = Variable._raw_value.__set__  # type: ignore[attr-defined]
_set_meta = Variable._var_metadata.__set__  # type: ignore[attr-defined]
_set_trace = Variable._trace_state.__set__  # type: ignore[attr-defined]
_set_frozen = Variable._frozen.__set__  # type: ignore[attr-defined]


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
            other = other._raw_value
        return op(self._raw_value, other)

    def reflected(self: Variable, other: Any) -> Any:
        return op(other, self._raw_value)

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
                other = other._raw_value
            self.set_value(_op(self._raw_value, other))
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
        return _op(self._raw_value)

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


def with_metadata(initializer: Callable[..., Any], **metadata: Any) -> Callable[..., Any]:
    """Wraps an initializer so the Variable built from its output carries ``metadata``.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> init = nnx.with_metadata(jax.nn.initializers.ones, sharding_names=("x",))
      >>> nnx.Param(init(jax.random.key(0), (2,))).sharding_names
      ('x',)
    """
    meta = {_METADATA_ALIASES.get(k, k): v for k, v in metadata.items()}

    def wrapped(*args: Any, **kwargs: Any) -> VariableMetadata:
        value = initializer(*args, **kwargs)
        if isinstance(value, VariableMetadata):
            return VariableMetadata(value.raw_value, {**value.metadata, **meta})
        return VariableMetadata(value, meta)

    wrapped.__wrapped__ = initializer  # type: ignore[attr-defined]
    return wrapped


# -- collection names (the Linen convention) -----------------------------------------------
_NAME_TO_TYPE: dict[str, type[Variable]] = {
    "params": Param,
    "batch_stats": BatchStat,
    "cache": Cache,
    "intermediates": Intermediate,
}
_TYPE_TO_NAME: dict[type[Variable], str] = {v: k for k, v in _NAME_TO_TYPE.items()}


def register_variable_name(name: str, typ: type[Variable] | None = None, *, overwrite=False):
    """Registers a collection name <-> Variable type pair; usable as a class decorator."""
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


def variable_type_from_name(name: str, *, allow_register: bool = False) -> type[Variable]:
    """Maps a collection name to its Variable type, creating one if ``allow_register``."""
    if name in _NAME_TO_TYPE:
        return _NAME_TO_TYPE[name]
    if not allow_register:
        raise ValueError(
            f"No Variable type registered for name {name!r}; register one with "
            "register_variable_name or pass allow_register=True."
        )
    typ = type(name, (Variable,), {"__slots__": ()})
    return register_variable_name(name, typ)


def variable_name_from_type(typ: type[Variable], *, allow_register: bool = False) -> str:
    """Inverse of :func:`variable_type_from_name`."""
    for t in typ.__mro__:
        if t in _TYPE_TO_NAME:
            return _TYPE_TO_NAME[t]
    if not allow_register:
        raise ValueError(f"No name registered for Variable type {typ.__name__}.")
    return register_variable_name(typ.__name__, typ) and typ.__name__
