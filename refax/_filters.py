"""Filters: a small language for selecting parts of a module's state.

Many refax functions (``split``, ``state``, ``grad(argnums=DiffState(...))``, optimizers) take
*filters* that say which Variables they act on. Every filter compiles to a *predicate*, a
function ``predicate(path, value) -> bool`` where ``path`` is the tuple of keys leading from the
root object to ``value`` (attribute names, list indices, dict keys) and ``value`` is usually a
:class:`~refax._variables.Variable`.

Filters are written either as literals or as filter objects:

* a type ``T`` selects values that are instances of ``T`` (``OfType(T)``),
* a string ``s`` selects values whose ``tag`` is ``s`` (``WithTag(s)``),
* ``...`` or ``True`` selects everything, ``None`` or ``False`` nothing,
* a tuple or list of filters selects the union of its members (``Any(...)``),
* any callable ``(path, value) -> bool`` is used as the predicate itself.

Filter objects combine: ``Any`` (union), ``All`` (intersection), ``Not`` (complement), and
``PathContains`` selects by a key anywhere on the path. All of them compare and hash by value,
so they can be dictionary or cache keys.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._filters import All, Not, PathContains, to_predicate
  >>> from refax._variables import BatchStat, Param
  >>> w, mean = Param(jnp.ones(3)), BatchStat(jnp.zeros(3))
  >>> is_param = to_predicate(Param)
  >>> is_param(("linear", "kernel"), w), is_param(("bn", "mean"), mean)
  (True, False)
  >>> frozen_kernels = All(Param, PathContains("kernel"), Not(PathContains("head")))
  >>> frozen_kernels(("body", "kernel"), w), frozen_kernels(("head", "kernel"), w)
  (True, False)
"""

from __future__ import annotations

import builtins
from collections.abc import Hashable, Iterable
from typing import Any as _Any

from refax.typing import Filter, FilterPredicate, PathParts

__all__ = [
    "Filter",
    "FilterPredicate",
    "OfType",
    "WithTag",
    "PathContains",
    "PathIn",
    "Any",
    "All",
    "Not",
    "Everything",
    "Nothing",
    "to_predicate",
    "filters_to_predicates",
]

_MISSING = object()


class _Filter:
    """Base of the filter objects: value equality and hashing from ``_key()``."""

    __slots__ = ()

    def _key(self) -> tuple:
        return ()

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __call__(self, path: PathParts, x: _Any) -> bool:  # pragma: no cover
        raise NotImplementedError


class OfType(_Filter):
    """Selects values that are instances of ``type``.

    Values that expose a ``type`` attribute holding a subclass of ``type`` also match, so
    descriptions of Variables that are not Variables themselves are selected too.

    Example:
      >>> from refax._filters import OfType
      >>> from refax._variables import BatchStat, Param, Variable
      >>> OfType(Variable)((), Param(1.0)), OfType(Param)((), BatchStat(1.0))
      (True, False)
      >>> OfType(Param)
      OfType(Param)
    """

    __slots__ = ("type",)

    def __init__(self, type: type):
        self.type = type

    def _key(self) -> tuple:
        return (self.type,)

    def __call__(self, path: PathParts, x: _Any) -> bool:
        if isinstance(x, self.type):
            return True
        t = getattr(x, "type", None)
        return isinstance(t, builtins.type) and issubclass(t, self.type)

    def __repr__(self) -> str:
        return f"OfType({_type_name(self.type)})"


class WithTag(_Filter):
    """Selects values whose ``tag`` attribute (e.g. Variable metadata) equals ``tag``.

    Example:
      >>> from refax._filters import WithTag
      >>> from refax._variables import Param
      >>> WithTag("frozen")((), Param(1.0, tag="frozen")), WithTag("frozen")((), Param(1.0))
      (True, False)
    """

    __slots__ = ("tag",)

    def __init__(self, tag: str):
        self.tag = tag

    def _key(self) -> tuple:
        return (self.tag,)

    def __call__(self, path: PathParts, x: _Any) -> bool:
        tag = getattr(x, "tag", _MISSING)
        if tag is _MISSING:
            return False
        try:
            return bool(tag == self.tag)
        except Exception:  # e.g. an array-valued tag
            return False

    def __repr__(self) -> str:
        return f"WithTag({self.tag!r})"


class PathContains(_Filter):
    """Selects values whose path contains ``key``.

    Args:
      key: the path key to look for.
      exact: if True (the default) some path key must equal ``key``; if False, ``str(key)``
        must be a substring of ``str(k)`` for some path key ``k``.

    Example:
      >>> from refax._filters import PathContains
      >>> PathContains("kernel")(("layers", 0, "kernel"), None)
      True
      >>> PathContains("ker", exact=False)(("layers", 0, "kernel"), None)
      True
      >>> PathContains(0)(("layers", 0, "kernel"), None), PathContains("ker")(("kernel",), None)
      (True, False)
    """

    __slots__ = ("key", "exact")

    def __init__(self, key: Hashable, exact: bool = True):
        self.key = key
        self.exact = exact

    def _key(self) -> tuple:
        return (self.key, self.exact)

    def __call__(self, path: PathParts, x: _Any) -> bool:
        if self.exact:
            return self.key in path
        key = str(self.key)
        return any(key in str(part) for part in path)

    def __repr__(self) -> str:
        if self.exact:
            return f"PathContains({self.key!r})"
        return f"PathContains({self.key!r}, exact=False)"


class PathIn(_Filter):
    """Selects values whose full path is one of ``paths``.

    Example:
      >>> from refax._filters import PathIn
      >>> f = PathIn(("encoder", "kernel"), ("decoder", "bias"))
      >>> f(("encoder", "kernel"), None), f(("encoder",), None)
      (True, False)
    """

    __slots__ = ("paths",)

    def __init__(self, *paths: PathParts):
        self.paths = frozenset(tuple(p) for p in paths)

    def _key(self) -> tuple:
        return (self.paths,)

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return path in self.paths

    def __repr__(self) -> str:
        return f"PathIn({', '.join(map(repr, sorted(self.paths, key=repr)))})"


class _Combination(_Filter):
    """Shared body of ``Any`` and ``All``: a tuple of compiled predicates."""

    __slots__ = ("predicates",)

    def __init__(self, *filters: Filter):
        self.predicates: tuple[FilterPredicate, ...] = tuple(map(to_predicate, filters))

    def _key(self) -> tuple:
        return self.predicates

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(_short_repr, self.predicates))})"


class Any(_Combination):
    """Union: selects values matched by at least one of ``filters`` (literals allowed).

    Example:
      >>> from refax._filters import Any
      >>> from refax._variables import BatchStat, Cache, Param
      >>> f = Any(Param, BatchStat)
      >>> f((), Param(1.0)), f((), BatchStat(1.0)), f((), Cache(1.0))
      (True, True, False)
      >>> f
      Any(Param, BatchStat)
    """

    __slots__ = ()

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return any(p(path, x) for p in self.predicates)


class All(_Combination):
    """Intersection: selects values matched by every one of ``filters`` (literals allowed).

    Example:
      >>> from refax._filters import All, PathContains
      >>> from refax._variables import Param
      >>> f = All(Param, PathContains("bias"))
      >>> f(("bias",), Param(1.0)), f(("kernel",), Param(1.0))
      (True, False)
    """

    __slots__ = ()

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return all(p(path, x) for p in self.predicates)


class Not(_Filter):
    """Complement: selects values that ``filter`` does not select.

    Example:
      >>> from refax._filters import Not
      >>> from refax._variables import BatchStat, Param
      >>> Not(Param)((), Param(1.0)), Not(Param)((), BatchStat(1.0))
      (False, True)
      >>> Not(Param)
      Not(Param)
    """

    __slots__ = ("predicate",)

    def __init__(self, filter: Filter):
        self.predicate: FilterPredicate = to_predicate(filter)

    def _key(self) -> tuple:
        return (self.predicate,)

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return not self.predicate(path, x)

    def __repr__(self) -> str:
        return f"Not({_short_repr(self.predicate)})"


class Everything(_Filter):
    """Selects every value (the compiled form of ``...`` and ``True``)."""

    __slots__ = ()

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "Everything()"


class Nothing(_Filter):
    """Selects no value (the compiled form of ``None`` and ``False``)."""

    __slots__ = ()

    def __call__(self, path: PathParts, x: _Any) -> bool:
        return False

    def __repr__(self) -> str:
        return "Nothing()"


_EVERYTHING = Everything()
_NOTHING = Nothing()
_CACHE: dict[_Any, FilterPredicate] = {}
_CACHE_LIMIT = 4096


def _type_name(t: _Any) -> str:
    return getattr(t, "__name__", None) or repr(t)


def _short_repr(p: FilterPredicate) -> str:
    """How a nested predicate is shown inside ``Any``/``All``/``Not``: types by name."""
    if type(p) is OfType:
        return _type_name(p.type)
    return repr(p)


def _cache_key(f: _Any) -> _Any:
    """A cache key for ``f``, or None if ``f`` should not be cached.

    Keys carry the type so that True/1, False/0 and (True,)/(1,) never share an entry. Plain
    callables are not cached: a lambda may close over large arrays.
    """
    if isinstance(f, tuple | list):
        keys = tuple(_cache_key(x) for x in f)
        return None if None in keys else (type(f), keys)
    if isinstance(f, type | str | _Filter) or f is None or f is Ellipsis or f is True or f is False:
        return (type(f), f)
    return None


def _compile(f: _Any) -> FilterPredicate:
    if isinstance(f, _Filter):
        return f
    if isinstance(f, type):
        return OfType(f)
    if isinstance(f, str):
        return WithTag(f)
    if f is Ellipsis or f is True:
        return _EVERYTHING
    if f is None or f is False:
        return _NOTHING
    if isinstance(f, tuple | list):
        return Any(*f)
    if callable(f):
        return f
    raise TypeError(
        f"Invalid filter {f!r} of type {type(f).__name__}. A filter is one of: a type "
        "(e.g. nnx.Param), a str tag, `...` or True (everything), None or False (nothing), "
        "a tuple or list of filters (their union), or a callable (path, value) -> bool "
        "such as nnx.PathContains('kernel')."
    )


def to_predicate(filter: Filter) -> FilterPredicate:
    """Compiles a filter literal or object into a predicate ``(path, value) -> bool``.

    Results are cached for hashable literals; filter objects and other callables are returned
    unchanged.

    Raises:
      TypeError: if ``filter`` is not one of the accepted forms.

    Example:
      >>> from refax._filters import to_predicate
      >>> from refax._variables import BatchStat, Param
      >>> to_predicate(Param), to_predicate("dropout"), to_predicate(...), to_predicate(None)
      (OfType(Param), WithTag('dropout'), Everything(), Nothing())
      >>> to_predicate((Param, BatchStat))
      Any(Param, BatchStat)
    """
    if isinstance(filter, _Filter):
        return filter
    key = _cache_key(filter)
    if key is None:
        return _compile(filter)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable element, e.g. a filter object holding a list
        return _compile(filter)
    pred = _compile(filter)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.clear()
    _CACHE[key] = pred
    return pred


def filters_to_predicates(filters: Iterable[Filter]) -> tuple[FilterPredicate, ...]:
    """Compiles a sequence of filters, as given to ``split``/``state``, into predicates.

    ``...`` (or ``True``) selects everything, so only more of the same may follow it.

    Raises:
      ValueError: if ``...`` or ``True`` appears before the last position.
      TypeError: if some filter is not one of the accepted forms.

    Example:
      >>> from refax._filters import filters_to_predicates
      >>> from refax._variables import Param
      >>> filters_to_predicates((Param, ...))
      (OfType(Param), Everything())
    """
    filters = tuple(filters)
    is_all = [f is Ellipsis or f is True or isinstance(f, Everything) for f in filters]
    for i, everything in enumerate(is_all):
        if everything and not all(is_all[i:]):
            raise ValueError(
                f"`...` or `True` can only be used as the last filters (they select "
                f"everything); got one at index {i} of {filters!r}. Move it to the end."
            )
    return tuple(map(to_predicate, filters))
