"""``bridge.Module``: Linen-style modules (dataclass fields, ``setup`` / ``compact``,
``init`` / ``apply``) that are refax Modules underneath.

A bridge Module is an ordinary refax :class:`~refax.Module` whose subclasses are dataclasses
(fields become constructor arguments, as in Linen) with two extra keyword arguments, ``name``
and ``parent``. What Linen keeps in a scope tree, the bridge keeps in the object graph:

* a submodule created inside a ``@bridge.compact`` method is attached to its parent as an
  attribute named like Linen names it (``Dense_0``, ``Dense_1``, or the ``name=`` given); one
  created in ``setup`` gets the name of the attribute it is assigned to;
* ``self.param(name, init_fn, *args)`` / ``self.variable(collection, name, init_fn, *args)``
  create refax Variables (``Param``, or the type registered for the collection) as
  attributes while initialising, and read them afterwards;
* every module of one model shares a :class:`Scope` (its ``Rngs`` and the collections that
  may change), set by ``init`` / ``apply``.

``init(rngs, *args)`` runs the model on a copy and returns the Variables as Linen's nested
``{collection: {name: ...}}`` dict; ``apply(variables, *args)`` loads such a dict into a fresh
copy (before the submodules exist: a value waits, as a plain dict, under the name its module
will get) and runs it. Because the modules are refax Modules, refax's transforms
(``nnx.vmap``, ``nnx.scan``, ``nnx.remat``, ...) work on them inside those methods.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
from flax.core import meta as linen_meta
from flax.core import scope as linen_scope

import refax as _nnx
from refax._object import _STATE_ATTR
from refax._rngs import RngState
from refax._variables import Variable, VariableMetadata, variable_type_from_name
from refax.nnx.bridge import _context
from refax.nnx.bridge._variables import (
    flatten_collections,
    linen_collection,
    nest,
    to_linen_var,
    to_nnx_var,
)

__all__ = ["Module", "Scope", "AttrPriority", "compact", "merge_into"]

M = TypeVar("M", bound="Module")
F = TypeVar("F", bound=Callable[..., Any])
_FROM_CONTEXT = object()
_SETUP_DONE = "_bridge_setup_done"
_PRIORITIES = "_bridge_priorities"
# Linen's error classes (reached through a module that imported them, whatever `flax.errors`
# names at the time)
linen_errors = linen_scope.errors


class AttrPriority(enum.IntEnum):
    """Which attribute names a module shared under several names in Linen's variables: the
    one of highest priority (lowest value), then the first in sorted order."""

    HIGH = 0
    DEFAULT = 1
    LOW = 2


class Scope(_nnx.Object):
    """What all modules of one bridge model share during ``init`` / ``apply``.

    Args:
      rngs: the :class:`~refax.Rngs` that ``param`` and ``make_rng`` draw from.
      mutable: the Linen collections that may change (``True``: all, ``False``: none, a name
        or a tuple of names).

    Example:
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> scope = bridge.Scope(nnx.Rngs(0), mutable=True)
      >>> scope.is_mutable("params")
      True
    """

    def __init__(self, rngs: _nnx.Rngs, mutable: Any = False):
        self.rngs = rngs
        self.mutable = _freeze_mutable(mutable)

    def is_mutable(self, collection: str) -> bool:
        """Whether ``collection`` may change in this call."""
        return _matches(self.mutable, collection)


def _freeze_mutable(mutable: Any) -> Any:
    if isinstance(mutable, (bool, str)):
        return mutable
    return tuple(mutable)


def _matches(mutable: Any, collection: str) -> bool:
    if isinstance(mutable, bool):
        return mutable
    if isinstance(mutable, str):
        return mutable == collection
    return collection in mutable


def compact(fn: F) -> F:
    """Marks a bridge Module method as *compact*: submodules created in it are named and
    attached automatically (``ClassName_0``, ``ClassName_1``, ...), as in Linen.

    Args:
      fn: the method.

    Returns:
      The same function, marked.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> class Scale(bridge.Module):
      ...   @bridge.compact
      ...   def __call__(self, x):
      ...     return x * self.param("s", nnx.initializers.ones, (x.shape[-1],))
      >>> Scale().init(0, jnp.ones((1, 3)))["params"]["s"].shape
      (3,)
    """
    fn._bridge_compact = True  # type: ignore[attr-defined]
    return fn


def _as_rngs(rngs: Any) -> _nnx.Rngs:
    if isinstance(rngs, _nnx.Rngs):
        return rngs
    if rngs is None:
        return _nnx.Rngs()
    if isinstance(rngs, Mapping):
        return _nnx.Rngs(**rngs)
    return _nnx.Rngs(rngs)


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    compact_method = getattr(fn, "_bridge_compact", False)

    @functools.wraps(fn)
    def wrapped(self: Module, *args: Any, **kwargs: Any) -> Any:
        if name != "setup":
            self._try_setup()
        with _context.module_frame(self, compact_method):
            return fn(self, *args, **kwargs)

    wrapped._bridge_wrapped = True  # type: ignore[attr-defined]
    return wrapped


class _ModuleMeta(type):
    """Handles the ``parent=`` argument and the binding of a new module to its parent."""

    def __call__(cls, *args: Any, parent: Any = _FROM_CONTEXT, **kwargs: Any) -> Any:
        frame = _context.current_context()
        if parent is _FROM_CONTEXT:
            parent = frame.module if frame is not None else None
        module = super().__call__(*args, **kwargs)
        if not isinstance(parent, Module):
            return module
        module.scope = parent.scope
        if module.name is None and frame is not None and frame.in_compact:
            if frame.module is parent:
                module.name = frame.next_name(type(module).__name__)
        if module.name is None:
            return module  # named by the attribute it is assigned to (setup)
        existing = parent.__dict__.get(module.name)
        if isinstance(existing, Module) and type(existing) is type(module):
            return existing  # a compact method called again: the same submodule
        parent.__setattr__(module.name, module)
        return module


@dataclasses.dataclass(eq=False, repr=False)
class Module(_nnx.Module, pytree=False, metaclass=_ModuleMeta):
    """A Linen-style module (fields, ``setup`` or ``@bridge.compact``, ``init`` / ``apply``)
    that is a refax Module.

    Subclasses are dataclasses: annotated class attributes are constructor arguments, and
    every module also takes ``name=`` and ``parent=`` keywords. See the module docstring of
    ``refax.nnx.bridge`` for how variables, names and scopes map onto the object graph.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax.nnx import bridge
      >>> class Dense(bridge.Module):
      ...   features: int
      ...   @bridge.compact
      ...   def __call__(self, x):
      ...     w = self.param("w", nnx.initializers.lecun_normal(), (x.shape[-1], self.features))
      ...     return x @ w
      >>> class MLP(bridge.Module):
      ...   @bridge.compact
      ...   def __call__(self, x):
      ...     hidden = Dense(4)(x)  # named Dense_0 (Linen names at construction)
      ...     return Dense(2)(jax.nn.relu(hidden))
      >>> variables = MLP().init(0, jnp.ones((1, 3)))
      >>> jax.tree.map(jnp.shape, variables)
      {'params': {'Dense_0': {'w': (3, 4)}, 'Dense_1': {'w': (4, 2)}}}
      >>> MLP().apply(variables, jnp.ones((5, 3))).shape
      (5, 2)
    """

    name: str | None = dataclasses.field(default=None, kw_only=True)

    def __init_subclass__(cls, pytree: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(pytree=pytree, **kwargs)
        dataclasses.dataclass(eq=False, repr=False)(cls)
        for key, value in list(cls.__dict__.items()):
            if not callable(value) or isinstance(value, (type, staticmethod, classmethod)):
                continue
            if getattr(value, "_bridge_wrapped", False):
                continue
            if key in ("__call__", "setup") or not (key.startswith("_") or key in _BASE_NAMES):
                setattr(cls, key, _wrap(key, value))

    # -- attributes ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "scope":
            return None
        d = self.__dict__
        if not name.startswith("_") and _STATE_ATTR in d and not d.get(_SETUP_DONE):
            self._try_setup()
            if name in self.__dict__:
                return self.__dict__[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name != "scope":
            old = self.__dict__.get(name)
            if isinstance(value, Module) and value.name is None:
                value.name = name
                _set_scope(value, self.scope)
            if type(old) is dict and old and isinstance(value, _nnx.Pytree):
                merge_into(value, old)  # values loaded by apply before the module existed
        super().__setattr__(name, value)

    def set_attr_priority(self, name: str, priority: AttrPriority) -> None:
        """Sets which of several names of a shared submodule Linen's variables use.

        Args:
          name: the attribute name.
          priority: its :class:`AttrPriority`.
        """
        prios = dict(self.__dict__.get(_PRIORITIES, ()))
        prios[name] = AttrPriority(priority)
        setattr(self, _PRIORITIES, tuple(sorted(prios.items())))

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Override to create submodules and variables; runs once, before the first method
        call (or attribute lookup that needs it)."""

    def _try_setup(self) -> None:
        if self.__dict__.get(_SETUP_DONE):
            return
        setattr(self, _SETUP_DONE, True)
        if type(self).setup is not Module.setup:
            self.setup()

    # -- variables -------------------------------------------------------------------------
    def is_initializing(self) -> bool:
        """True while ``init`` (or ``bridge.lazy_init``) runs."""
        return _context.is_initializing()

    def is_mutable_collection(self, col: str) -> bool:
        """Whether Linen collection ``col`` may change in this call."""
        if _context.is_initializing():
            return True
        scope = self.scope
        return scope is not None and scope.is_mutable(col)

    def make_rng(self, name: str = "params") -> jax.Array:
        """A fresh key from the scope's stream ``name`` (or its ``default`` stream).

        Args:
          name: the stream name.
        """
        return self._bound_scope("make_rng").rngs[name]()

    def _bound_scope(self, what: str) -> Scope:
        scope = self.scope
        if scope is None:
            raise ValueError(
                f"{type(self).__name__}.{what}: the module is not bound to a scope. Call it "
                "through init(...) / apply(...), or create it inside another bridge Module."
            )
        return scope

    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any, unbox: bool = True):
        """The value of parameter ``name``, created with ``init_fn(key, *init_args)`` (a key
        from the ``params`` stream) while initialising.

        Args:
          name: the attribute (and Linen) name.
          init_fn: an initializer; it may return a Linen box or a ``VariableMetadata``.
          *init_args: its arguments after the key (shape, dtype, ...).
          unbox: return the raw value (``True``) or the :class:`~refax.Param`.
        """
        current = self.__dict__.get(name)
        if not isinstance(current, Variable):
            if not _context.is_initializing():
                raise linen_errors.ScopeParamNotFoundError(name, self._path_name())
            key = self._bound_scope("param").rngs.params()
            current = _new_variable("params", init_fn(key, *init_args))
            setattr(self, name, current)
        return current.get_value() if unbox else current

    def variable(
        self,
        col: str,
        name: str,
        init_fn: Callable[..., Any] | None = None,
        *init_args: Any,
        unbox: bool = True,
    ) -> Variable:
        """The Variable ``name`` of Linen collection ``col`` (its type is the one registered
        for ``col``), created with ``init_fn(*init_args)`` when missing and the collection
        may change.

        Args:
          col: the collection name.
          name: the attribute (and Linen) name.
          init_fn: makes the initial value.
          *init_args: its arguments.
          unbox: kept for Linen compatibility (the Variable is always returned).
        """
        del unbox
        current = self.__dict__.get(name)
        if isinstance(current, Variable):
            return current
        if init_fn is None or not self.is_mutable_collection(col):
            raise linen_errors.ScopeVariableNotFoundError(name, col, self._path_name())
        current = _new_variable(col, init_fn(*init_args))
        setattr(self, name, current)
        return current

    def _path_name(self) -> str:
        return self.name or type(self).__name__

    # -- Linen-style entry points ----------------------------------------------------------
    def init_with_output(
        self,
        rngs: Any = None,
        *args: Any,
        method: str | Callable[..., Any] | None = None,
        mutable: Any = True,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Runs the model on a fresh copy, creating its variables; returns
        ``(output, variables)``.

        Args:
          rngs: an :class:`~refax.Rngs`, a seed, a key, or a dict of keys per stream.
          *args: the inputs.
          method: the method to run (a name or a function taking the module); default
            ``__call__``.
          mutable: kept for Linen compatibility (every collection is returned).
          **kwargs: keyword inputs.
        """
        del mutable
        out, module = self._run(rngs, True, None, method, args, kwargs)
        return out, collect(module, True)

    def init(self, rngs: Any = None, *args: Any, method: Any = None, **kwargs: Any):
        """Like :meth:`init_with_output`, returning only the variables."""
        return self.init_with_output(rngs, *args, method=method, **kwargs)[1]

    def apply(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        rngs: Any = None,
        method: str | Callable[..., Any] | None = None,
        mutable: Any = False,
        **kwargs: Any,
    ) -> Any:
        """Runs the model on a fresh copy holding ``variables``.

        Args:
          variables: Linen-style ``{collection: {name: ...}}`` (as ``init`` returns).
          *args: the inputs.
          rngs: keys for this call (see :meth:`init_with_output`).
          method: the method to run; default ``__call__``.
          mutable: the collections that may change; when not ``False`` the result is
            ``(output, updated_collections)``.
          **kwargs: keyword inputs.
        """
        out, module = self._run(rngs, mutable, variables, method, args, kwargs)
        if mutable is False:
            return out
        return out, collect(module, mutable)

    def _run(
        self,
        rngs: Any,
        mutable: Any,
        variables: Mapping[str, Any] | None,
        method: Any,
        args: tuple,
        kwargs: dict,
    ) -> tuple[Any, Module]:
        module = _nnx.clone(self, graph=True)
        rngs = _as_rngs(rngs)
        if variables is not None and "params" not in rngs and "default" not in rngs:
            # submodules of the other kind are built again on apply; their initializers
            # need a key, though what they draw is replaced by the variables
            rngs = _nnx.Rngs(0, **{name: stream.key[...] for name, stream in rngs.items()})
        scope = Scope(rngs, mutable)
        _set_scope(module, scope)
        with _context.initializing(variables is None):
            module._try_setup()
            if variables:
                merge_into(module, _variable_tree(variables))
            if method is None:
                out = module(*args, **kwargs)
            elif isinstance(method, str):
                out = getattr(module, method)(*args, **kwargs)
            else:
                out = method(module, *args, **kwargs)
        return out, module


_BASE_NAMES = frozenset(dir(Module))


def _new_variable(col: str, value: Any) -> Variable:
    if isinstance(value, linen_meta.AxisMetadata):
        return to_nnx_var(col, value)
    if isinstance(value, Variable):
        return value
    typ = variable_type_from_name(col, allow_register=True)
    if isinstance(value, VariableMetadata):
        return typ(value)
    return typ(value)


def _set_scope(root: Any, scope: Scope | None) -> None:
    for _, node in _nnx.iter_graph(root, graph=True):
        if isinstance(node, Module) and node.__dict__.get("scope") is not scope:
            node.scope = scope


def _variable_tree(variables: Mapping[str, Any]) -> dict[Any, Any]:
    return nest(
        (path, to_nnx_var(col, leaf))
        for (col, path), leaf in flatten_collections(variables).items()
    )


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, Mapping):
        return node.get(key)
    if isinstance(node, Sequence) and not isinstance(node, str):
        try:
            return node[int(key)]
        except (ValueError, IndexError, TypeError):
            return None
    d = node.__dict__
    if key in d:
        return d[key]
    if isinstance(key, str) and key.isdigit():
        return d.get(int(key))
    return None


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, dict):
        node[key] = value
    elif isinstance(node, Sequence):
        node[int(key)] = value  # type: ignore[index]
    else:
        setattr(node, key, value)


def merge_into(node: Any, tree: Mapping[Any, Any]) -> None:
    """Writes a nested dict of Variables into ``node``: values into the Variables already
    there, new Variables (or, for a missing submodule, the plain dict that waits for it)
    where nothing is.

    Args:
      node: a refax Object, dict or list.
      tree: nested dicts whose leaves are Variables.
    """
    stack: list[tuple[Any, Mapping[Any, Any]]] = [(node, tree)]
    while stack:
        target, sub = stack.pop()
        for key, value in sub.items():
            current = _child(target, key)
            if isinstance(value, Variable):
                if isinstance(current, Variable):
                    current.set_value(value.get_value())
                    if current.get_metadata() != value.get_metadata():
                        current.set_metadata(value.get_metadata())
                else:
                    _set_child(target, key, value)
            elif current is None or isinstance(current, Variable):
                _set_child(target, key, dict(value))
            else:
                stack.append((current, value))


def _ordered_children(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, Variable):
        return iter(())
    if isinstance(node, _nnx.Pytree):
        d = node.__dict__
        prios = dict(d.get(_PRIORITIES, ())) if isinstance(node, Module) else {}
        keys = [k for k in d if not (isinstance(k, str) and k.startswith("_"))]
        keys.sort(key=lambda k: (prios.get(k, AttrPriority.DEFAULT), str(k)))
        return ((k, d[k]) for k in keys)
    if isinstance(node, Mapping):
        return ((k, node[k]) for k in sorted(node, key=str))
    if isinstance(node, (list, tuple)):
        return iter(enumerate(node))
    return iter(())


def collect(module: Any, mutable: Any = True) -> dict[str, Any]:
    """The Variables under ``module`` as Linen's ``{collection: nested dict}`` (RNG state
    and scopes left out), each submodule under its first name in priority order.

    Args:
      module: the root.
      mutable: which collections to include (``True``: all; a name or a sequence of names).
    """
    seen: set[int] = set()
    flat: dict[str, list[tuple[tuple, Any]]] = {}
    stack: list[tuple[tuple, Any]] = [((), module)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, (Variable, _nnx.Pytree)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, Variable):
            if isinstance(node, RngState):
                continue
            col = linen_collection(node)
            if _matches(mutable, col):
                flat.setdefault(col, []).append((path, to_linen_var(node)))
            continue
        if isinstance(node, (Scope, _nnx.Rngs)):
            continue
        children = list(_ordered_children(node))
        stack.extend(((*path, k), v) for k, v in reversed(children))
    return {col: nest(items) for col, items in flat.items()}
