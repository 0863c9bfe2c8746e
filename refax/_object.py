"""Objects and Modules: plain mutable Python classes whose attributes form an object graph.

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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

from refax import _kinds
from refax._tracers import bump_epoch, current_trace
from refax._variables import Intermediate, Perturbation, Variable
from refax.errors import TraceContextError

__all__ = [
    "Pytree",
    "Object",
    "Module",
    "ObjectState",
    "data",
    "static",
    "Data",
    "Static",
    "register_data_type",
    "is_data",
    "has_data",
    "check_pytree",
]

M = TypeVar("M", bound="Module")
_MISSING = object()
_STATE_ATTR = "_pytree__state"
_CAPTURES = "__captures__"  # set by refax.capture on every Module it runs (see _capture.py)


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


def data(value: Any = _MISSING, **field_kwargs: Any) -> Any:
    """Marks a value assigned to an attribute as data (state), e.g. ``self.x = nnx.data(x)``.

    Without a value it returns a dataclass field specifier for :func:`dataclass`.
    """
    if value is _MISSING:
        return dataclasses.field(metadata={"refax_kind": "data"}, **field_kwargs)
    return _Marker(value, "data")


def static(value: Any = _MISSING, **field_kwargs: Any) -> Any:
    """Marks a value assigned to an attribute as static (it goes into the GraphDef)."""
    if value is _MISSING:
        return dataclasses.field(metadata={"refax_kind": "static"}, **field_kwargs)
    return _Marker(value, "static")


class _AnnotationMarker:
    def __init__(self, kind: str):
        self.kind = kind

    def __getitem__(self, item: Any) -> Any:
        return item


Data = _AnnotationMarker("data")
Static = _AnnotationMarker("static")

_DATA_TYPES: tuple[type, ...] = (jax.Array, np.ndarray, Variable)


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
    """Re-validates every attribute of ``obj`` (static ones must be hashable)."""
    if not isinstance(obj, Pytree):
        raise TypeError(f"check_pytree expects an Object, got {type(obj).__name__}.")
    for name, value in vars(obj).items():
        if name == _STATE_ATTR or is_data(value):
            continue
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"Attribute {type(obj).__name__}.{name} is static but unhashable "
                f"({type(value).__name__}); wrap it with nnx.data(...) or use a hashable type."
            ) from None


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

    def __init_subclass__(cls, pytree: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if pytree is not True and pytree is not False:
            raise TypeError(f"pytree= must be True or False, got {pytree!r}.")
        cls._refax_pytree = pytree  # type: ignore[attr-defined]
        if pytree and "_refax_registered" not in cls.__dict__:
            cls._refax_registered = True  # type: ignore[attr-defined]
            jax.tree_util.register_pytree_with_keys(
                cls, _pytree_flatten_with_keys, lambda aux, ch: _pytree_unflatten(cls, aux, ch)
            )

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = object.__new__(cls)
        object.__setattr__(obj, _STATE_ATTR, ObjectState())
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
        from refax._display import object_repr

        return object_repr(self)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from refax._display import treescope_object

        return treescope_object(self, path, subtree_renderer)


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
def _split_attrs(obj: Pytree) -> tuple[list[str], list[tuple[str, Any]]]:
    st: ObjectState = obj.__dict__[_STATE_ATTR]
    data_names, static_items = [], []
    for name in obj.__dict__:
        if name == _STATE_ATTR:
            continue
        value = obj.__dict__[name]
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
    marks = (st.static_names, st.data_names)
    return children, (tuple(data_names), tuple(static_items), marks)


def _pytree_unflatten(cls: type, aux: Any, children: Any) -> Any:
    data_names, static_items, (static_names, data_marks) = aux
    obj = object.__new__(cls)
    d = obj.__dict__
    d.update(static_items)
    d.update(zip(data_names, children))
    marks = (static_names, data_marks) if static_names or data_marks else None
    d[_STATE_ATTR] = new_object_state(current_trace(), marks)
    return obj


# -- Module --------------------------------------------------------------------------------
def _tuple_reduce(xs: Any, x: Any) -> tuple:
    return (*xs, x)


def _tuple_init() -> tuple:
    return ()


class Module(Pytree):
    """Base class for layers and models.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> class Scale(nnx.Module):
      ...   def __init__(self):
      ...     self.s = nnx.Param(jnp.array(2.0))
      ...   def __call__(self, x):
      ...     self.sow(nnx.Intermediate, 'seen', x)
      ...     return x * self.s
      >>> m = Scale()
      >>> m(jnp.array(3.0))
      Array(6., dtype=float32, weak_type=True)
      >>> m.seen.value
      (Array(3., dtype=float32, weak_type=True),)
    """

    def sow(
        self,
        variable_type: type[Variable] | str,
        name: str,
        value: Any,
        reduce_fn: Callable[[Any, Any], Any] = _tuple_reduce,
        init_fn: Callable[[], Any] = _tuple_init,
    ) -> bool:
        """Records ``value`` under ``name``, folding repeated calls with ``reduce_fn``.

        Inside :func:`refax.capture` the value goes to the capture's collection for
        ``variable_type`` (returned by ``capture``); when that type is not being captured
        the call does nothing and returns False. Outside ``capture`` the value is stored in a
        Variable attribute ``name`` of this Module (created on the first call).

        Args:
          variable_type: the Variable type (or its registered name) of the record, usually
            :class:`Intermediate`.
          name: the key of the record.
          value: the value to record.
          reduce_fn: ``reduce_fn(previous, value)`` gives the new record (default: append to
            a tuple).
          init_fn: gives the ``previous`` of the first call (default: an empty tuple).

        Returns:
          True if the value was recorded.
        """
        if isinstance(variable_type, str):
            from refax._variables import variable_type_from_name

            variable_type = variable_type_from_name(variable_type, allow_register=True)
        captures = self.__dict__.get(_CAPTURES)
        if captures is not None:
            for var in captures:
                if type(var) is variable_type:
                    records = var.get_value()
                    previous = records[name] if name in records else init_fn()
                    var.set_value({**records, name: reduce_fn(previous, value)})
                    return True
            return False
        existing = self.__dict__.get(name, _MISSING)
        if existing is _MISSING:
            setattr(self, name, variable_type(reduce_fn(init_fn(), value)))
        elif isinstance(existing, variable_type):
            existing.set_value(reduce_fn(existing.get_value(), value))
        else:
            raise ValueError(
                f"Cannot sow into {type(self).__name__}.{name}: it holds a "
                f"{type(existing).__name__}, expected {variable_type.__name__}."
            )
        return True

    def perturb(
        self, name: str, value: Any, variable_type: type[Variable] | str = Perturbation
    ) -> Any:
        """Returns ``value`` plus a perturbation ``name`` (zeros at first) to take gradients at.

        Inside :func:`refax.capture` the perturbation comes from the capture's collection for
        ``variable_type`` (its ``init=`` State, or zeros recorded on the first call); when
        that type is not being captured, ``value`` is returned unchanged. Outside ``capture``
        it is a Variable attribute ``name`` of this Module. Gradients with respect to the
        perturbation are gradients with respect to the intermediate ``value``.

        Args:
          name: the key of the perturbation.
          value: the intermediate value (an array or pytree of arrays).
          variable_type: the Variable type (or its registered name) of the perturbation.

        Returns:
          ``value + perturbation``: use it in place of ``value``.
        """
        import jax.numpy as jnp

        if isinstance(variable_type, str):
            from refax._variables import variable_type_from_name

            variable_type = variable_type_from_name(variable_type, allow_register=True)
        captures = self.__dict__.get(_CAPTURES)
        if captures is not None:
            for var in captures:
                if type(var) is variable_type:
                    records = var.get_value()
                    if name not in records:
                        records = {**records, name: jax.tree.map(jnp.zeros_like, value)}
                        var.set_value(records)
                    return jax.tree.map(jnp.add, records[name], value)
            return value
        existing = self.__dict__.get(name, _MISSING)
        if existing is _MISSING:
            setattr(self, name, variable_type(jax.tree.map(jnp.zeros_like, value)))
            existing = self.__dict__[name]
        elif not isinstance(existing, variable_type):
            raise ValueError(
                f"Cannot perturb {type(self).__name__}.{name}: it holds a "
                f"{type(existing).__name__}, expected {variable_type.__name__}."
            )
        return jax.tree.map(jnp.add, existing.get_value(), value)

    def iter_modules(self) -> Iterator[tuple[tuple, Module]]:
        """Yields ``(path, module)`` for every Module reachable from this one, root first."""
        from refax._graph import iter_modules

        return iter_modules(self)

    def iter_children(self) -> Iterator[tuple[Any, Any]]:
        """Yields ``(key, child)`` for the direct graph-node children (Modules, Variables)."""
        from refax._graph import iter_children

        return iter_children(self)

    def set_attributes(
        self, *filters: Any, raise_if_not_found: bool = True, **attributes: Any
    ) -> None:
        """Sets attributes on every sub-Module (matching ``filters``, default all) that has them.

        Raises ValueError naming the attributes no Module had, unless ``raise_if_not_found``
        is False.
        """
        from refax._filters import to_predicate

        preds = [to_predicate(f) for f in filters]
        remaining = set(attributes)
        for path, module in self.iter_modules():
            if preds and not any(p(path, module) for p in preds):
                continue
            for name, value in attributes.items():
                if hasattr(module, name):
                    setattr(module, name, value)
                    remaining.discard(name)
        if remaining and raise_if_not_found:
            raise ValueError(
                f"Could not find attribute(s) {sorted(remaining)} on any sub-Module of "
                f"{type(self).__name__}; pass raise_if_not_found=False to ignore."
            )

    def train(self, **attributes: Any) -> None:
        """Training mode: ``deterministic=False``, ``use_running_average=False`` everywhere."""
        self.set_attributes(
            deterministic=False, use_running_average=False, **attributes, raise_if_not_found=False
        )

    def eval(self, **attributes: Any) -> None:
        """Evaluation mode: ``deterministic=True``, ``use_running_average=True`` everywhere."""
        self.set_attributes(
            deterministic=True, use_running_average=True, **attributes, raise_if_not_found=False
        )

    def set_view(self, **kwargs: Any) -> None:  # overridden by layers that have view flags
        """Hook used by ``nnx.view``; the base Module accepts no view arguments."""
        if kwargs:
            raise ValueError(f"{type(self).__name__}.set_view got unknown {sorted(kwargs)}")


_ = Intermediate  # re-exported for sow's default users
