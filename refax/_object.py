"""Objects: plain mutable Python classes whose attributes form an object graph.

An ``Object`` is an ordinary Python object: subclass it, assign attributes in ``__init__`` and
mutate them whenever you like. Attributes may hold Variables, other Objects, JAX or NumPy arrays
(dynamic state), containers (list, dict, tuple, nested) of any of these, or static Python values
(ints, strings, functions), which end up in the ``GraphDef``. The same Object may be referenced
from several places: the graph functions (``split``/``merge``/``update``) and the lifted
transforms preserve that sharing.

Two rules keep reference semantics sound under JAX tracing:

* every Object remembers the JAX trace it was created in, and assigning or deleting an
  attribute from another trace raises :class:`refax.errors.TraceContextError`;
* ``module.count = x`` where ``count`` already holds a Variable and ``x`` is an array or a
  number updates that Variable's value in place (so ``module.count += 1`` works); assigning a new
  Variable or Object rebinds the attribute.

``Pytree`` subclasses (``Module`` included) are also registered as JAX pytrees: their data
attributes are the children, static attributes the auxiliary data. ``Object`` never is.

This module is the object layer: it sits on the Variables and below the graph
(``refax._graph``), and owns the per-object bookkeeping (:class:`ObjectState`, stored under
``_STATE_ATTR`` in each object's ``__dict__``). ``Module``, whose helpers walk the graph, lives
above it in ``refax._module``.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> class Counter(nnx.Module):
  ...   def __init__(self):
  ...     self.count = nnx.Variable(jnp.array(0))
  ...   def __call__(self):
  ...     self.count += 1
  >>> c = Counter()
  >>> c(); c()
  >>> c.count.value
  Array(2, dtype=int32, weak_type=True)
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import threading
import typing
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

import jax
import numpy as np

from refax import _kinds
from refax._tracers import bump_epoch, current_trace
from refax._variables import DISPLAY, Variable
from refax.errors import TraceContextError

__all__ = [
    "Pytree",
    "Object",
    "ObjectState",
    "data",
    "static",
    "Data",
    "Static",
    "dataclass",
    "register_data_type",
    "is_data",
    "has_data",
    "check_pytree",
]

_MISSING = object()
# The key under which an object's ObjectState lives in its ``__dict__``; the graph, views,
# containers and display import it from here.
_STATE_ATTR = "_pytree__state"


class _InitFlag(threading.local):
    """Per thread: whether a lazy initialisation (e.g. ``bridge.lazy_init``) is running."""

    def __init__(self) -> None:
        self.stack: list[bool] = [False]


INIT_FLAG = _InitFlag()


class ObjectState:
    """Per-object bookkeeping stored in ``obj._pytree__state`` (never part of the graph).

    The entry also serves the walk cache: a graph walk keeps it last in the object's
    ``__dict__`` (see ``refax/_graph/README.md``), so it must never be written by hand.

    Attributes:
      trace_state: the JAX trace the object was created in.
      tracked: True once a graph walk has seen the object (a kept walk may then depend on
        the order of its ``__dict__``, so from then on no walk reorders it).
      layout, snap: how the last walk classified the attributes, and the ``__dict__`` values
        it did so from; the next walk reuses the layout and checks it against ``snap``.
      static_names: attributes forced static with :func:`static`.
      data_names: attributes forced data with :func:`data`.
      walks: cached graph walks rooted at this object (``refax._graph._cache``).
    """

    # The trace is set for every object; rarely set attributes are class-level defaults,
    # overridden in the instance dict when set.
    __slots__ = ("trace_state", "tracked", "layout", "snap", "__dict__", "__weakref__")
    static_names: frozenset = frozenset()
    data_names: frozenset = frozenset()
    walks: dict | None = None

    @property
    def initializing(self) -> bool:
        """True while a lazy initialisation runs in this thread (``bridge.lazy_init``, a
        bridge Module's ``init``): code may then create Variables it would otherwise find."""
        return INIT_FLAG.stack[-1]

    def __init__(self) -> None:
        self.trace_state = current_trace()
        self.tracked = False
        self.layout = self.snap = None

    def __repr__(self) -> str:
        return f"ObjectState(tracked={self.tracked})"


def new_object_state(trace: Any, marks: tuple | None = None) -> ObjectState:
    """A state for an object built by merge: created under ``trace``, with ``marks``
    (``(static_names, data_names)``) when there are any."""
    st = object.__new__(ObjectState)
    st.trace_state = trace
    st.tracked = False
    st.layout = st.snap = None
    if marks is not None:
        st.static_names, st.data_names = marks
    return st


# -- data / static markers ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Marker:
    value: Any
    kind: str  # 'data' | 'static'


_FIELD_KEY = "refax_kind"  # dataclass field metadata key set by data() / static()


def _field(kind: str, field_kwargs: dict[str, Any]) -> Any:
    metadata = dict(field_kwargs.pop("metadata", None) or {})
    if _FIELD_KEY in metadata:
        raise ValueError(f"nnx.{kind}(metadata=...) cannot contain the key {_FIELD_KEY!r}.")
    metadata[_FIELD_KEY] = kind
    return dataclasses.field(metadata=metadata, **field_kwargs)


def data(value: Any = _MISSING, /, **field_kwargs: Any) -> Any:
    """Marks an attribute as data (pytree state), whatever its value.

    ``self.x = nnx.data(value)`` stores ``value`` and marks ``x`` as data from then on: a
    Python number, or any value refax would otherwise keep static, becomes a state leaf. The
    mark stays until the attribute is assigned with :func:`static`.

    Called without a value, it is a field specifier for :func:`dataclass` (or a plain
    ``dataclasses.dataclass``): ``x: int = nnx.data()`` marks ``x`` as data in every instance
    of the class; ``field_kwargs`` (``default``, ``default_factory``, ``init``, ``kw_only``,
    ...) go to ``dataclasses.field``.

    Args:
      value: the value to assign.
      **field_kwargs: ``dataclasses.field`` options (only without ``value``).

    Returns:
      A marker to assign to an attribute, or a dataclass field.

    Example:
      >>> import jax
      >>> from refax import nnx
      >>> class Foo(nnx.Pytree):
      ...   def __init__(self):
      ...     self.lr = nnx.data(0.1)  # a pytree leaf
      ...     self.name = 'foo'        # static
      >>> jax.tree.leaves(Foo())
      [0.1]
    """
    if value is _MISSING:
        return _field("data", field_kwargs)
    if field_kwargs:
        raise TypeError(
            "nnx.data() takes either a value or dataclass field options, not both: use "
            "nnx.data(value) in __init__, or `x: T = nnx.data(default=...)` in a class body."
        )
    return _Marker(value, "data")


def static(value: Any = _MISSING, /, **field_kwargs: Any) -> Any:
    """Marks an attribute as static (kept in the GraphDef / pytree treedef), whatever its value.

    ``self.x = nnx.static(value)`` stores ``value`` and marks ``x`` as static from then on. A
    static value must be hashable and must not hold arrays, Variables or Objects (ValueError
    otherwise, also for later assignments to the attribute); an instance of a type registered
    with :func:`register_data_type` may be marked static explicitly.

    Called without a value, it is a field specifier for :func:`dataclass`:
    ``x: int = nnx.static()``.

    Args:
      value: the value to assign.
      **field_kwargs: ``dataclasses.field`` options (only without ``value``).

    Returns:
      A marker to assign to an attribute, or a dataclass field.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> class Foo(nnx.Pytree):
      ...   def __init__(self):
      ...     self.w = jnp.ones(2)
      ...     self.sizes = nnx.static((2,))
      >>> jax.tree.structure(Foo()).num_leaves
      1
    """
    if value is _MISSING:
        return _field("static", field_kwargs)
    if field_kwargs:
        raise TypeError(
            "nnx.static() takes either a value or dataclass field options, not both: use "
            "nnx.static(value) in __init__, or `x: T = nnx.static(default=...)` in a class body."
        )
    return _Marker(value, "static")


class _Tag:
    """The metadata that ``nnx.Data[T]`` / ``nnx.Static[T]`` put in ``typing.Annotated``."""

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"nnx.{self.kind.capitalize()}"


_DATA_TAG = _Tag("data")
_STATIC_TAG = _Tag("static")
_A = TypeVar("_A")

Data = Annotated[_A, _DATA_TAG]
Data.__doc__ = """Annotation marking a class attribute as data: ``x: nnx.Data[int]``.

Deprecated (a DeprecationWarning when the class is defined): prefer ``x: int = nnx.data()``.
``nnx.Data[T]`` is ``typing.Annotated[T, nnx.Data]``, so type checkers see ``T``.
"""
Static = Annotated[_A, _STATIC_TAG]
Static.__doc__ = """Annotation marking a class attribute as static: ``x: nnx.Static[int]``.

Deprecated (a DeprecationWarning when the class is defined): prefer ``x: int = nnx.static()``.
"""


def _annotation_kind(cls: type, annotation: Any) -> str | None:
    """'data' / 'static' for an ``nnx.Data[...]`` / ``nnx.Static[...]`` annotation, else None."""
    if isinstance(annotation, str):  # `from __future__ import annotations`: resolve the head
        head = annotation.strip("'\" ").split("[", 1)[0].strip()
        if not head.endswith(("Data", "Static")):
            return None
        first, *rest = head.split(".")
        obj = getattr(sys.modules.get(cls.__module__), first, None)
        for part in rest:
            obj = getattr(obj, part, None)
        if obj is None and first == "nnx" and rest in (["Data"], ["Static"]):
            return rest[0].lower()  # the module's `nnx` is not reachable (a local import)
        return "data" if obj is Data else "static" if obj is Static else None
    if typing.get_origin(annotation) is Annotated:
        for tag in annotation.__metadata__:
            if tag is _DATA_TAG or tag is _STATIC_TAG:
                return tag.kind
    return None


def _class_statement_level() -> int:
    """The warning stack level of the ``class`` statement being run (the first frame above
    ``_declared_marks`` that is neither in this file nor an ``__init_subclass__``)."""
    level, frame = 2, sys._getframe(2)  # level 1 is _declared_marks, which warns
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_name == "__init_subclass__"
    ):
        frame, level = frame.f_back, level + 1
    return level


def _declared_marks(cls: type) -> tuple[frozenset, frozenset] | None:
    """The attributes ``cls`` (with its bases) declares static / data: ``nnx.Data`` /
    ``nnx.Static`` annotations and ``nnx.data()`` / ``nnx.static()`` dataclass fields."""
    static_names: set = set()
    data_names: set = set()
    for base in reversed(cls.__mro__[1:]):
        marks = base.__dict__.get("_refax_marks")
        if marks is not None:
            static_names = (static_names - marks[1]) | marks[0]
            data_names = (data_names - marks[0]) | marks[1]
    own: dict[str, str] = {}
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        kind = _annotation_kind(cls, annotation)
        if kind is not None:
            warnings.warn(
                f"{cls.__name__}.{name}: nnx.{kind.capitalize()}[...] annotations are "
                f"deprecated; write `{name}: T = nnx.{kind}()` instead.",
                DeprecationWarning,
                stacklevel=_class_statement_level(),
            )
            own[name] = kind
    for name, value in cls.__dict__.items():
        if isinstance(value, dataclasses.Field) and _FIELD_KEY in value.metadata:
            kind = value.metadata[_FIELD_KEY]
            if own.get(name, kind) != kind:
                raise ValueError(
                    f"{cls.__name__}.{name} is annotated nnx.{own[name].capitalize()}[...] but "
                    f"declared with nnx.{kind}(): keep one of the two."
                )
            own[name] = kind
    for name, kind in own.items():
        if kind == "static":
            static_names.add(name)
            data_names.discard(name)
        else:
            data_names.add(name)
            static_names.discard(name)
    if not static_names and not data_names:
        return None
    return frozenset(static_names), frozenset(data_names)


_DATA_TYPES: tuple[type, ...] = (jax.Array, np.ndarray, Variable)
_STATE_TYPES: tuple[type, ...] = (jax.Array, np.ndarray, Variable)  # + Pytree, below


def register_data_type(typ: type) -> type:
    """Registers ``typ`` so its instances count as data (state leaves, like arrays) without
    an ``nnx.data`` wrapper."""
    global _DATA_TYPES
    if typ not in _DATA_TYPES:
        _DATA_TYPES = (*_DATA_TYPES, typ)
    _kinds.register_leaf_type(typ)
    return typ


def is_data(value: Any) -> bool:
    """True if ``value`` is state: arrays, Variables, Objects, or containers holding any."""
    if isinstance(value, _DATA_TYPES) or isinstance(value, Pytree):
        return True
    return bool(has_data(value))


def has_data(value: Any) -> list[Any]:
    """Returns the data leaves (arrays, Variables, Objects) found inside ``value``."""
    leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, (Variable, Pytree)))
    return [x for x in leaves if isinstance(x, _DATA_TYPES) or isinstance(x, Pytree)]


def check_pytree(obj: Any) -> None:
    """Re-validates every attribute of ``obj``.

    Attributes marked static (:func:`static`, or declared so by the class) must not hold
    arrays, Variables or Objects (ValueError); other static values must be hashable
    (TypeError).

    Args:
      obj: a Pytree / Object / Module instance.

    Raises:
      TypeError: ``obj`` is not a Pytree, or a static attribute is unhashable.
      ValueError: an attribute marked static holds data.
    """
    if not isinstance(obj, Pytree):
        raise TypeError(f"check_pytree expects an Object, got {type(obj).__name__}.")
    static_names = obj.__dict__[_STATE_ATTR].static_names
    for name, value in vars(obj).items():
        if name in static_names:
            _check_static(obj, name, value, "assigned")
        if name == _STATE_ATTR or is_data(value):
            continue
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"Attribute {type(obj).__name__}.{name} is static but unhashable "
                f"({type(value).__name__}); wrap it with nnx.data(...) or use a hashable type."
            ) from None


def _state_leaves(value: Any) -> list[Any]:
    """The arrays, Variables and Objects inside ``value`` (what a static value cannot hold)."""
    if isinstance(value, _STATE_TYPES):
        return [value]
    leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, (Variable, Pytree)))
    return [x for x in leaves if isinstance(x, _STATE_TYPES)]


def _type_name(value: Any) -> str:
    if isinstance(value, jax.Array):
        return "jax.Array"
    if isinstance(value, np.ndarray):
        return "numpy.ndarray"
    return type(value).__name__


def _check_static(obj: Pytree, name: Any, value: Any, how: str) -> None:
    """Raises ValueError if ``value``, for the static attribute ``name``, holds state.

    ``how``: 'marker' (``nnx.static(value)``) or 'assigned' (a plain assignment to an
    attribute marked static earlier, or declared static by the class)."""
    found = _state_leaves(value)
    if not found:
        return
    where = f"attribute {name!r} of {type(obj).__name__}"
    kinds = ", ".join(sorted({_type_name(x) for x in found}))
    vtype = _type_name(value)
    if how == "marker":
        raise ValueError(
            f"Found data in value of type {vtype!r} marked nnx.static(...) for {where}: it "
            f"holds {kinds}, which cannot go into the GraphDef. Assign the value without "
            "nnx.static(...) (or with nnx.data(...)) to keep it as state."
        )
    marks = type(obj)._refax_marks
    if marks is not None and name in marks[0]:
        raise ValueError(
            f"Found unexpected data on value of type {vtype!r} for {where}, which the class "
            f"declares static: it holds {kinds}. Remove the data from the value, or declare "
            f"the field with nnx.data() instead of nnx.static()."
        )
    raise ValueError(
        f"Found data on value of type {vtype!r} assigned to {where}, which is marked static "
        f"(nnx.static): it holds {kinds}. Remove the data from the value, or assign it with "
        f"nnx.data(...) to make the attribute data."
    )


def _is_value_like(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic, numbers.Number))


_DESCRIPTOR_CACHE: dict[tuple[type, str], bool] = {}


def _has_data_descriptor(cls: type, name: str) -> bool:
    key = (cls, name)
    hit = _DESCRIPTOR_CACHE.get(key)
    if hit is None:
        attr = getattr(cls, name, None)
        hit = _DESCRIPTOR_CACHE[key] = hasattr(type(attr), "__set__") and not isinstance(
            attr, Variable
        )
    return hit


class Pytree:
    """Base of every refax object: a mutable Python object tracked as a graph node.

    Subclasses are registered as JAX pytrees unless declared with ``pytree=False``.
    """

    _refax_object = True  # marks graph-node classes for refax._kinds
    # (static_names, data_names) the class declares (nnx.static()/nnx.data() fields,
    # nnx.Static/nnx.Data annotations), computed once per class; None when there are none
    _refax_marks: tuple[frozenset, frozenset] | None = None

    def __init_subclass__(cls, pytree: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if pytree is not True and pytree is not False:
            raise TypeError(f"pytree= must be True or False, got {pytree!r}.")
        cls._refax_pytree = pytree  # type: ignore[attr-defined]
        cls._refax_marks = _declared_marks(cls)
        if pytree and "_refax_registered" not in cls.__dict__:
            cls._refax_registered = True  # type: ignore[attr-defined]
            jax.tree_util.register_pytree_with_keys(
                cls, _pytree_flatten_with_keys, lambda aux, ch: _pytree_unflatten(cls, aux, ch)
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = object.__new__(cls)
        st = ObjectState()
        marks = cls._refax_marks
        if marks is not None:
            st.static_names, st.data_names = marks
        object.__setattr__(obj, _STATE_ATTR, st)
        return obj

    # -- mutation ---------------------------------------------------------------------------
    def _check_trace(self) -> None:
        st = self.__dict__.get(_STATE_ATTR)
        if st is not None and st.trace_state != current_trace():
            raise TraceContextError.for_object(self)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        st: ObjectState | None = d.get(_STATE_ATTR)
        if st is not None and st.trace_state != current_trace():
            self._check_trace()
        if _has_data_descriptor(type(self), name):
            object.__setattr__(self, name, value)
            return
        if name == _STATE_ATTR:
            raise AttributeError(f"{name!r} is refax's bookkeeping entry and cannot be set")
        if type(value) is _Marker:
            value = self._mark(name, value)
        elif st is not None and name in st.static_names:
            _check_static(self, name, value, "assigned")
        old = d.get(name, _MISSING)
        if old is value:
            return
        if isinstance(old, Variable) and not isinstance(value, Variable) and _is_value_like(value):
            old.set_value(value)
            return
        d[name] = value
        if st is not None and st.layout is not None:
            st.layout = st.snap = None  # reclassified by the next walk; the old value released

    def _mark(self, name: str, marker: _Marker) -> Any:
        st: ObjectState = self.__dict__[_STATE_ATTR]
        if marker.kind == "static":
            _check_static(self, name, marker.value, "marker")
            st.static_names = st.static_names | {name}
            st.data_names = st.data_names - {name}
        else:
            st.data_names = st.data_names | {name}
            st.static_names = st.static_names - {name}
        st.layout = st.snap = None
        bump_epoch()
        return marker.value

    def __delattr__(self, name: str) -> None:
        self._check_trace()
        if _has_data_descriptor(type(self), name):
            object.__delattr__(self, name)
            return
        if name == _STATE_ATTR:
            raise AttributeError(f"{name!r} is refax's bookkeeping entry and cannot be deleted")
        try:
            del self.__dict__[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None
        st = self.__dict__.get(_STATE_ATTR)
        if st is not None:
            st.layout = st.snap = None

    @property
    def _pytree__nodes(self) -> Mapping[Any, bool]:
        """Read-only view, for code written against the reference's private attribute: every
        attribute name (refax's entry included) mapped to whether it is data right now."""
        d = self.__dict__
        st: ObjectState = d[_STATE_ATTR]
        nodes = {}
        for name, value in d.items():
            if name == _STATE_ATTR or name in st.data_names:
                nodes[name] = True
            elif name in st.static_names:
                nodes[name] = False
            else:
                nodes[name] = is_data(value)
        return MappingProxyType(nodes)

    # -- copying / pickling ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != _STATE_ATTR}
        st = self.__dict__.get(_STATE_ATTR)
        if st is not None and (st.static_names or st.data_names):
            state["__refax_marks__"] = (st.static_names, st.data_names)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        marks = state.pop("__refax_marks__", None)
        d = self.__dict__
        d.pop(_STATE_ATTR, None)
        d.update(state)
        d[_STATE_ATTR] = new_object_state(current_trace(), marks)

    # -- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return DISPLAY.object_repr(self)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return DISPLAY.treescope_object(self, path, subtree_renderer)


_STATE_TYPES = (*_STATE_TYPES, Pytree)


_T = TypeVar("_T", bound=type)


@typing.dataclass_transform(field_specifiers=(dataclasses.field, data, static))
def dataclass(
    cls: _T | None = None,
    /,
    *,
    init: bool = True,
    eq: bool = True,
    order: bool = False,
    unsafe_hash: bool = False,
    match_args: bool = True,
    kw_only: bool = False,
) -> Any:
    """``dataclasses.dataclass`` for Pytree / Module subclasses.

    Fields declared with :func:`data` or :func:`static` are data or static in every instance
    (a Python number declared ``nnx.data()`` is a pytree leaf; an array given to a field
    declared ``nnx.static()`` raises ValueError); the other fields are classified by their
    values, like any attribute. The generated ``__init__`` assigns through the Pytree's
    ``__setattr__``, so all of refax's checks apply. refax's own ``repr`` is kept.

    Works with or without arguments: ``@nnx.dataclass`` or ``@nnx.dataclass(kw_only=True)``;
    the keyword arguments are those of ``dataclasses.dataclass``.

    Args:
      cls: the class to decorate (a subclass of :class:`Pytree`).
      init, eq, order, unsafe_hash, match_args, kw_only: as for ``dataclasses.dataclass``.

    Returns:
      The class (or a decorator, when called without ``cls``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> @nnx.dataclass
      ... class Scaler(nnx.Pytree):
      ...   w: jax.Array
      ...   scale: float = nnx.data(default=2.0)
      ...   name: str = nnx.static(default='scaler')
      >>> s = Scaler(jnp.ones(2))
      >>> jax.tree.leaves(s)  # in attribute-name order
      [2.0, Array([1., 1.], dtype=float32)]
      >>> s.name
      'scaler'
    """
    options = dict(
        init=init,
        eq=eq,
        order=order,
        unsafe_hash=unsafe_hash,
        match_args=match_args,
        kw_only=kw_only,
        repr=False,
    )

    def decorate(c: _T) -> _T:
        if not (isinstance(c, type) and issubclass(c, Pytree)):
            raise TypeError(
                f"nnx.dataclass decorates subclasses of nnx.Pytree (or Module), got {c!r}; "
                "use dataclasses.dataclass for other classes."
            )
        return dataclasses.dataclass(c, **options)  # type: ignore[call-overload]

    return decorate if cls is None else decorate(cls)


class Object(Pytree, pytree=False):
    """A graph node that is never a JAX pytree (pass it through transforms, not jax.tree)."""

    def __init_subclass__(cls, pytree: bool = False, **kwargs: Any) -> None:
        if pytree is not False:
            raise TypeError(
                f"{cls.__name__}: Object subclasses cannot be pytrees (got pytree={pytree!r}); "
                "subclass nnx.Pytree instead."
            )
        super().__init_subclass__(pytree=False, **kwargs)


# -- pytree protocol for Pytree subclasses --------------------------------------------------
def _sorted_names(d: dict) -> list:
    """The attribute names of ``d`` but refax's entry, sorted (int keys of a List too), so
    objects with the same attributes have the same treedef whatever the assignment order."""
    names = [k for k in d if k != _STATE_ATTR]
    try:
        names.sort()
    except TypeError:
        names.sort(key=lambda k: (type(k).__name__, k))
    return names


def _split_attrs(obj: Pytree) -> tuple[list[str], list[tuple[str, Any]]]:
    d = obj.__dict__
    st: ObjectState = d[_STATE_ATTR]
    data_names, static_items = [], []
    for name in _sorted_names(d):
        value = d[name]
        if name in st.static_names:
            static_items.append((name, value))
        elif name in st.data_names or is_data(value):
            data_names.append(name)
        else:
            static_items.append((name, value))
    return data_names, static_items


def _pytree_flatten_with_keys(obj: Pytree):
    data_names, static_items = _split_attrs(obj)
    children = [
        (
            jax.tree_util.GetAttrKey(n) if isinstance(n, str) else jax.tree_util.SequenceKey(n),
            obj.__dict__[n],
        )
        for n in data_names
    ]
    st = obj.__dict__[_STATE_ATTR]
    return children, (
        tuple(data_names),
        tuple(static_items),
        _Marks(st.static_names, st.data_names),
    )


class _Marks(tuple):
    """An object's data/static marks in its treedef. Carried to rebuild the object, but not
    part of the structure: the attribute split the marks decided is already in the treedef,
    so equal splits are equal trees (a prefix built by ``jax.tree.map(f, obj)`` fits ``obj``,
    whose rebuilt copy marks as data the attributes whose new values are not arrays)."""

    __slots__ = ()

    def __new__(cls, static_names: frozenset, data_names: frozenset) -> _Marks:
        return tuple.__new__(cls, (static_names, data_names))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Marks)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, _Marks)

    def __hash__(self) -> int:
        return 0


def _pytree_unflatten(cls: type, aux: Any, children: Any) -> Any:
    data_names, static_items, (static_names, data_marks) = aux
    obj = object.__new__(cls)
    d = obj.__dict__
    d.update(static_items)
    d.update(zip(data_names, children))
    # Children that would not classify as data by value (jax.tree.map(lambda _: 0, obj))
    # stay data, so the rebuilt object flattens to the same structure.
    kept = [n for n, c in zip(data_names, children) if n not in data_marks and not is_data(c)]
    if kept:
        data_marks = data_marks | frozenset(kept)
    marks = (static_names, data_marks) if static_names or data_marks else None
    d[_STATE_ATTR] = new_object_state(current_trace(), marks)
    return obj
