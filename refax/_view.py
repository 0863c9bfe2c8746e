"""Views: copies of a model that share its state but differ in configuration.

A *view* of a model is a new object graph with the same structure whose Objects (Modules,
Rngs, ...) are fresh copies while its Variables are the very same Variable objects as in the
original. Changing the configuration of the view (static attributes such as
``deterministic``) leaves the original alone, but every state update made through the view
(running statistics, parameters, RNG counters) is seen by the original, and vice versa. That
makes views the cheap way to hold a training and an evaluation version of one model::

    train_model = nnx.view(model, deterministic=False, use_running_average=False)
    eval_model = nnx.view(model, deterministic=True, use_running_average=True)

:func:`view` configures through the ``set_view`` hook of each Module class (``Dropout`` takes
``deterministic``, ``BatchNorm`` ``use_running_average``, ``MultiHeadAttention``
``deterministic``/``decode``/...): every Module gets the subset of the keyword arguments its
hook accepts, and a keyword no hook accepts is an error. :func:`view_info` lists the hooks'
arguments of a model; :func:`with_attributes` is the hook-free version, overwriting named
attributes on every sub-Module that has them.

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> from refax._view import view
  >>> class Block(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(2, 3, rngs=rngs)
  ...     self.bn = nnx.BatchNorm(3, rngs=rngs)
  ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.dropout(self.bn(self.linear(x)))
  >>> model = Block(nnx.Rngs(0))
  >>> eval_model = view(model, deterministic=True, use_running_average=True)
  >>> eval_model.dropout.deterministic, model.dropout.deterministic
  (True, False)
  >>> eval_model.linear.kernel is model.linear.kernel  # state is shared
  True
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from refax._config import graph_mode_default
from refax._filters import to_predicate
from refax._graph import iter_graph
from refax._module import Module
from refax._object import _STATE_ATTR, ObjectState, Pytree, new_object_state
from refax._tracers import current_trace
from refax._variables import Variable
from refax.typing import Filter

__all__ = ["view", "view_info", "with_attributes"]

A = TypeVar("A")


# -- copying: new Objects and containers, the same Variables -----------------------------------
class _Copier:
    """Copies the Objects and containers of a graph, keeping Variables and leaves shared.

    Sharing and cycles among Objects and containers are preserved (one copy per original).
    ``shared`` records an object reached by more than one path, for the tree-mode check.
    """

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.seen_leaves: set[int] = set()
        self.shared: tuple[str, Any] | None = None

    def _note_shared(self, path: tuple, value: Any) -> None:
        if self.shared is None:
            self.shared = ("/".join(map(str, path)), value)

    def copy(self, value: Any, path: tuple = ()) -> Any:
        if isinstance(value, Variable):
            if id(value) in self.seen_leaves:
                self._note_shared(path, value)
            self.seen_leaves.add(id(value))
            return value
        hit = self.memo.get(id(value))
        if hit is not None:
            self._note_shared(path, value)
            return hit[1]
        if isinstance(value, Pytree):
            return self._copy_object(value, path)
        if isinstance(value, (list, dict)):
            new = copy.copy(value)
            self.memo[id(value)] = (value, new)  # keep `value` alive so its id stays unique
            items = enumerate(value) if isinstance(value, list) else list(value.items())
            for key, child in items:
                new[key] = self.copy(child, (*path, key))
            return new
        if isinstance(value, tuple):
            children = [self.copy(c, (*path, i)) for i, c in enumerate(value)]
            if all(a is b for a, b in zip(children, value)):
                return value
            if hasattr(value, "_make"):  # namedtuple
                return type(value)._make(children)
            return type(value)(children)
        return value

    def _copy_object(self, obj: Pytree, path: tuple) -> Pytree:
        new = object.__new__(type(obj))
        self.memo[id(obj)] = (obj, new)
        old_state: ObjectState = obj.__dict__[_STATE_ATTR]
        marks = (old_state.static_names, old_state.data_names)
        d = new.__dict__
        for name, child in obj.__dict__.items():
            if name != _STATE_ATTR:
                d[name] = self.copy(child, (*path, name))
        d[_STATE_ATTR] = new_object_state(current_trace(), marks)
        return new


def _graph_mode(graph: bool | None) -> bool:
    if graph is None:
        return graph_mode_default()
    return graph


def _copy_graph(node: A, graph: bool | None, fn_name: str) -> A:
    copier = _Copier()
    out = copier.copy(node)
    if copier.shared is not None and not _graph_mode(graph):
        path, value = copier.shared
        raise ValueError(
            f"nnx.{fn_name} in tree mode (graph=False) found a shared reference: the "
            f"{type(value).__name__} at '{path}' is also reachable by another path. Use graph "
            "mode (graph=True) or remove the sharing."
        )
    return out


# -- set_view hooks ----------------------------------------------------------------------------
def _own_hook(obj: Any) -> Callable[..., Any] | None:
    """The class's ``set_view``, or None when it has none beyond the base Module's."""
    hook = getattr(type(obj), "set_view", None)
    if hook is None or hook is Module.set_view or not callable(hook):
        return None
    return hook


_ACCEPTED: dict[Any, frozenset[str] | None] = {}


def _accepted_names(hook: Callable[..., Any]) -> frozenset[str] | None:
    """Keyword names ``hook`` accepts (``self`` excluded); None if it takes ``**kwargs``."""
    try:
        return _ACCEPTED[hook]
    except (KeyError, TypeError):
        pass
    params = list(inspect.signature(hook).parameters.values())[1:]  # drop self
    names: frozenset[str] | None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = None
    else:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names = frozenset(p.name for p in params if p.kind in kinds)
    try:
        _ACCEPTED[hook] = names
    except TypeError:  # unhashable callable
        pass
    return names


def view(
    node: A,
    /,
    *,
    only: Filter = ...,
    raise_if_not_found: bool = True,
    graph: bool | None = None,
    **kwargs: Any,
) -> A:
    """Returns a copy of ``node`` whose Modules were configured by their ``set_view`` hooks.

    Objects (Modules, Rngs, ...) and containers are copied, Variables are shared with
    ``node``: state updates through the view reach the original, configuration changes do
    not. Every selected Module whose class defines ``set_view`` is called with the subset of
    ``kwargs`` its signature accepts (all of them if it takes ``**kwargs``); children are
    configured before their parents.

    Args:
      node: a Module, or any graph of Objects (list, dict or tuple of Modules included).
      only: filter selecting the Modules to configure (default all), e.g. ``nnx.Dropout``.
      raise_if_not_found: raise when a keyword is accepted by no selected Module's hook.
      graph: tree mode when False: a shared Object or Variable is then an error.
      **kwargs: the view arguments, e.g. ``deterministic=True``,
        ``use_running_average=True``; :func:`view_info` lists those a model accepts.

    Returns:
      The configured copy.

    Raises:
      ValueError: a keyword was used by no hook (``raise_if_not_found``), or a shared
        reference in tree mode.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax._view import view
      >>> model = nnx.Sequential(
      ...     nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
      >>> eval_model = view(model, deterministic=True)
      >>> bool((eval_model(jnp.ones((1, 2))) == model.layers[0](jnp.ones((1, 2)))).all())
      True
      >>> view(model, determinstic=True)
      Traceback (most recent call last):
        ...
      ValueError: Unused keys found in nnx.view: ['determinstic']...
    """
    predicate = to_predicate(only)
    out = _copy_graph(node, graph, "view")
    remaining = set(kwargs)
    accepted_somewhere: set[str] = set()
    for path, obj in iter_graph(out):
        hook = _own_hook(obj)
        if hook is None or not predicate(path, obj):
            continue
        names = _accepted_names(hook)
        if names is None:
            hook(obj, **kwargs)
            remaining.clear()
            accepted_somewhere.update(kwargs)
            continue
        hook(obj, **{k: v for k, v in kwargs.items() if k in names})
        remaining.difference_update(names)
        accepted_somewhere.update(names)
    if remaining and raise_if_not_found:
        known = sorted(accepted_somewhere) or "none"
        raise ValueError(
            f"Unused keys found in nnx.view: {sorted(remaining)}: no selected Module's "
            f"set_view accepts them (accepted in this model: {known}). Check the spelling "
            "(nnx.view_info(node) lists the arguments) or pass raise_if_not_found=False."
        )
    return out


def with_attributes(
    node: A,
    /,
    *,
    only: Filter = ...,
    raise_if_not_found: bool = True,
    graph: bool | None = None,
    **attributes: Any,
) -> A:
    """Returns a copy of ``node`` with ``attributes`` set on every sub-Module that has them.

    Like :meth:`Module.set_attributes`, but ``node`` is left unchanged: Objects are copied,
    Variables shared. An attribute that holds a Variable is given a *new* Variable of the same
    type and metadata holding the new value, so the original's Variable keeps its value.

    Args:
      node: a Module, or any graph of Objects.
      only: filter selecting the Modules to change (default all).
      raise_if_not_found: raise when an attribute exists on no selected Module.
      graph: tree mode when False: a shared Object or Variable is then an error.
      **attributes: attribute names and their new values.

    Returns:
      The changed copy.

    Raises:
      ValueError: an attribute was found on no selected Module (``raise_if_not_found``).

    Example:
      >>> from refax import nnx
      >>> from refax._view import with_attributes
      >>> model = nnx.Sequential(nnx.Dropout(0.1), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> new = with_attributes(model, only=nnx.Dropout, rate=0.5)
      >>> new.layers[0].rate, model.layers[0].rate
      (0.5, 0.1)
    """
    predicate = to_predicate(only)
    out = _copy_graph(node, graph, "with_attributes")
    remaining = set(attributes)
    for path, module in iter_graph(out):
        if not isinstance(module, Module) or not predicate(path, module):
            continue
        for name, value in attributes.items():
            if not hasattr(module, name):
                continue
            current = module.__dict__.get(name)
            if isinstance(current, Variable) and not isinstance(value, Variable):
                value = current.replace(value)  # never write into the shared Variable
            setattr(module, name, value)
            remaining.discard(name)
    if remaining and raise_if_not_found:
        raise ValueError(
            "Could not find at least one instance of the following attributes: "
            f"{sorted(remaining)}. No selected sub-Module of {type(node).__name__} has them; "
            "check the spelling or pass raise_if_not_found=False."
        )
    return out


# -- view_info ---------------------------------------------------------------------------------
def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _parse_args_section(doc: str) -> dict[str, str]:
    """Argument descriptions of the ``Args:`` section of a Google-style docstring.

    Each description is returned indented by 4 spaces (continuation lines keep their extra
    indentation relative to the first).
    """
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    base = _indent_of(lines[start])
    body: list[str] = []
    for line in lines[start + 1 :]:
        if line.strip() and _indent_of(line) <= base:
            break  # the next section
        body.append(line)
    entries = [line for line in body if line.strip()]
    if not entries:
        return {}
    arg_indent = _indent_of(entries[0])
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in body:
        if line.strip() and _indent_of(line) == arg_indent and ":" in line:
            head, _, text = line.strip().partition(":")
            name = head.split("(")[0].strip().lstrip("*")
            current = out.setdefault(name, [])
            if text.strip():
                current.append("    " + text.strip())
        elif current is not None and line.strip():
            extra = max(_indent_of(line) - arg_indent - 2, 0)
            current.append("    " + " " * extra + line.strip())
    return {name: "\n".join(desc) for name, desc in out.items()}


def _format_annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def view_info(node: Any, /, *, only: Filter = ..., graph: bool | None = None) -> str:
    """Describes the ``set_view`` arguments of every Module type in ``node``.

    One block per class defining a ``set_view`` hook (sorted by qualified name): one line per
    argument with its annotation and default, followed by its description from the hook's
    Google-style ``Args:`` docstring section. A hook without a docstring is shown by its
    signature.

    Args:
      node: the model to describe.
      only: filter selecting the Modules to describe (default all).
      graph: tree mode when False: a shared Object or Variable is then an error.

    Returns:
      The description ("" when no Module has a hook).

    Example:
      >>> from refax import nnx
      >>> from refax._view import view_info
      >>> model = nnx.Sequential(nnx.Dropout(0.5), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> print(view_info(model))
      BatchNorm:
        use_running_average: bool | None = None
          True: normalize with the stored running statistics
          (evaluation); False: with the statistics of the batch, updating the running ones
          (training).
      Dropout:
        deterministic: bool | None = None
          True: return the inputs unchanged (evaluation); False: drop entries
          (training).
    """
    predicate = to_predicate(only)
    if not _graph_mode(graph):
        _copy_graph(node, graph, "view_info")  # raises on shared references
    classes: dict[type, None] = {}
    for path, obj in iter_graph(node):
        if _own_hook(obj) is not None and predicate(path, obj):
            classes[type(obj)] = None
    out: list[str] = []
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        out.append(f"{cls.__qualname__}:")
        hook = cls.set_view  # type: ignore[attr-defined]
        sig = inspect.signature(hook)
        doc = inspect.cleandoc(hook.__doc__) if hook.__doc__ else None  # not inherited
        if not doc:
            out.append(f"  set_view{sig}")
            continue
        described = _parse_args_section(doc)
        for i, (name, param) in enumerate(sig.parameters.items()):
            if i == 0 or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue  # self, *args, **kwargs
            line = f"  {name}"
            if param.annotation is not inspect.Parameter.empty:
                line += f": {_format_annotation(param.annotation)}"
            if param.default is not inspect.Parameter.empty:
                line += f" = {param.default}"
            out.append(line)
            if name in described:
                out.append(described[name])
    return "\n".join(out)
