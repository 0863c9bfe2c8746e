"""Capturing intermediate values: ``capture`` collects what ``Module.sow``/``perturb`` record.

A layer records an intermediate value with ``self.sow(nnx.Intermediate, 'name', value)``
and marks a point to take gradients at with ``x = self.perturb('name', x)``. Wrapping the
forward computation in :func:`capture` runs it with a fresh, empty collection per Module and
Variable type, and returns the collections as a State next to the output, shaped like the
model (``state['block']['name']``). Nothing is left behind on the Modules, so the same model
can be captured again and again, inside or outside ``nnx.jit``/``nnx.grad``.

While the function runs, each Module of the model holds its collections in an attribute
``__captures__`` (a tuple of Variables whose values are ``{name: value}`` dicts). Being
ordinary state, it travels through the lifted transforms, so values sown inside a nested
``nnx.jit`` are captured too.

Gradients of intermediates take two captures: one to create zero perturbations, one, inside
the differentiated loss, that starts from them (``init=``) and records the intermediates::

    _, perturbations = nnx.capture(model, nnx.Perturbation)(x)

    def loss(model, perturbations, x):
      y, inter = nnx.capture(model, nnx.Intermediate, init=perturbations)(x)
      return y.sum(), inter

    (grads, perturbation_grads), inter = nnx.grad(loss, argnums=(0, 1), has_aux=True)(
        model, perturbations, x)

Example:
  >>> import jax.numpy as jnp
  >>> from refax import nnx
  >>> from refax._capture import capture
  >>> class Model(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(2, 3, rngs=rngs)
  ...   def __call__(self, x):
  ...     h = self.linear(x)
  ...     self.sow(nnx.Intermediate, 'hidden', h)
  ...     return h.sum()
  >>> model = Model(nnx.Rngs(0))
  >>> y, inter = capture(model, nnx.Intermediate)(jnp.ones((1, 2)))
  >>> inter['hidden'].value[0].shape
  (1, 3)
  >>> hasattr(model, 'hidden')  # nothing stored on the model
  False
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from refax._module import _CAPTURES, Module, iter_modules
from refax._statelib import State, split_state
from refax._variables import Variable

__all__ = ["capture"]

_MISSING = object()


def _variables_by_module_path(init: Mapping[Any, Any] | None) -> dict[tuple, dict[str, Variable]]:
    """``{module_path: {name: Variable}}`` from a nested State/dict of captured Variables."""
    out: dict[tuple, dict[str, Variable]] = {}

    def visit(node: Mapping[Any, Any], path: tuple) -> None:
        for key, value in node.items():
            if isinstance(value, Variable):
                out.setdefault(path, {})[key] = value
            elif isinstance(value, Mapping):
                visit(value, (*path, key))

    if init is not None:
        visit(init, ())
    return out


# -- method_outputs: temporarily instrumented classes ----------------------------------------
_PATCH_LOCK = threading.Lock()
_PATCHED: dict[type, list[Any]] = {}  # class -> [users, {name: original function}]
_BASE_API = frozenset(name for name in vars(Module) if not name.startswith("_"))


def _instrumented(name: str, method: Callable[..., Any], var_type: type[Variable]) -> Callable:
    @functools.wraps(method)
    def wrapper(self: Module, *args: Any, **kwargs: Any) -> Any:
        out = method(self, *args, **kwargs)
        if _CAPTURES in self.__dict__:  # only Modules being captured record anything
            self.sow(var_type, name, out)
        return out

    return wrapper


def _patch(classes: Iterable[type], var_type: type[Variable]) -> list[type]:
    """Wraps the public methods (and ``__call__``) each class defines itself so that their
    outputs are sown as ``var_type`` under the method name. Returns the classes to unpatch."""
    done = []
    with _PATCH_LOCK:
        for cls in classes:
            entry = _PATCHED.get(cls)
            if entry is None:
                originals = {
                    name: fn
                    for name, fn in vars(cls).items()
                    if inspect.isfunction(fn)
                    and (name == "__call__" or not name.startswith("_"))
                    and name not in _BASE_API
                }
                for name, fn in originals.items():
                    setattr(cls, name, _instrumented(name, fn, var_type))
                entry = _PATCHED[cls] = [0, originals]
            entry[0] += 1
            done.append(cls)
    return done


def _unpatch(classes: Iterable[type]) -> None:
    with _PATCH_LOCK:
        for cls in classes:
            entry = _PATCHED[cls]
            entry[0] -= 1
            if entry[0] == 0:
                for name, fn in entry[1].items():
                    setattr(cls, name, fn)
                del _PATCHED[cls]


# -- capture -------------------------------------------------------------------------------
def _install(module: Any, var_types: tuple, init: Any) -> list[tuple[Module, Any]]:
    """Gives every Module of ``module`` its capture collections; returns what to restore."""
    by_path = _variables_by_module_path(init)
    installed = []
    for path, m in iter_modules(module):
        collections: dict[type, dict[str, Any]] = {t: {} for t in var_types}
        for name, var in by_path.get(path, {}).items():
            collections.setdefault(type(var), {})[name] = var.get_value()
        installed.append((m, m.__dict__.get(_CAPTURES, _MISSING)))
        setattr(m, _CAPTURES, tuple(t(c) for t, c in collections.items()))
    return installed


def _collect(module: Any, var_types: tuple) -> State:
    """The recorded values of ``var_types`` as a State shaped like the Module tree."""
    nested: dict[Any, Any] = {}
    for path, m in iter_modules(module):
        for var in m.__dict__.get(_CAPTURES, ()):
            if type(var) not in var_types:
                continue
            for name, value in var.get_value().items():
                node = nested
                for key in path:
                    node = node.setdefault(key, {})
                node[name] = type(var)(value)
    return State(_sorted(nested))


def _sorted(d: dict) -> dict:
    """``d`` with keys sorted at every level (ints before strings), for a stable display."""
    keys = sorted(d, key=lambda k: (isinstance(k, str), str(k) if isinstance(k, str) else k))
    return {k: _sorted(d[k]) if type(d[k]) is dict else d[k] for k in keys}


def _restore(installed: list[tuple[Module, Any]]) -> None:
    for m, previous in reversed(installed):
        if previous is _MISSING:
            if _CAPTURES in m.__dict__:
                delattr(m, _CAPTURES)
        else:  # a capture nested in another one on the same Module
            setattr(m, _CAPTURES, previous)


def capture(
    fn: Callable[..., Any] | type[Variable],
    *var_types: type[Variable],
    init: Mapping[Any, Any] | None = None,
    method_outputs: type[Variable] | None = None,
) -> Callable[..., Any]:
    """Wraps ``fn`` so that it also returns the values its Modules sow or perturb.

    Args:
      fn: a function whose first argument is the model, a Module (its ``__call__`` is run)
        or a bound method of a Module. A Variable type instead starts the list of
        ``var_types`` and makes ``capture`` a decorator (``@nnx.capture(nnx.Intermediate)``).
      *var_types: the Variable types to collect, e.g. ``nnx.Intermediate``. ``sow`` and
        ``perturb`` calls for other types do nothing while ``fn`` runs.
      init: a State (or nested dict) of previously captured Variables to start from, e.g.
        the perturbations of a first capture; its types are collected while ``fn`` runs but
        only returned if listed in ``var_types``.
      method_outputs: a Variable type: the output of every public method (and ``__call__``)
        of every Module is sown under the method name as this type.

    Returns:
      A function with the signature of ``fn`` returning ``(output, state)`` for one type,
      ``(output, state_1, ..., state_n)`` for several (each value goes to the first type it
      is an instance of, so list subclasses such as ``Perturbation`` before
      ``Intermediate``), or just ``output`` when no type is given.

    Example:
      >>> import jax.numpy as jnp
      >>> from refax import nnx
      >>> from refax._capture import capture
      >>> class Model(nnx.Module):
      ...   def __call__(self, x):
      ...     x = self.perturb('x', x)
      ...     self.sow(nnx.Intermediate, 'double', 2 * x)
      ...     return (3 * x).sum()
      >>> model = Model()
      >>> _, perturbations = capture(model, nnx.Perturbation)(jnp.ones(2))
      >>> def loss(model, perturbations, x):
      ...   return capture(model, nnx.Intermediate, init=perturbations)(x)
      >>> grad_fn = nnx.grad(loss, argnums=nnx.DiffState(1, nnx.Perturbation), has_aux=True)
      >>> grad, inter = grad_fn(model, perturbations, jnp.ones(2))
      >>> grad['x'].value, inter['double'].value
      (Array([3., 3.], dtype=float32), (Array([2., 2.], dtype=float32),))
    """
    if isinstance(fn, type) and issubclass(fn, Variable):
        all_types = (fn, *var_types)

        def decorator(actual_fn: Callable[..., Any]) -> Callable[..., Any]:
            return capture(actual_fn, *all_types, init=init, method_outputs=method_outputs)

        return decorator
    for t in var_types:
        if not (isinstance(t, type) and issubclass(t, Variable)):
            raise TypeError(
                f"capture: var_types must be Variable subclasses (e.g. nnx.Intermediate), got "
                f"{t!r}."
            )
    owner: Module | None = None
    if inspect.ismethod(fn) and isinstance(fn.__self__, Module):
        owner = fn.__self__
    elif isinstance(fn, Module):
        owner = fn

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if owner is not None:
            module = owner
        elif args:
            module = args[0]
        else:
            raise TypeError(
                "capture: the wrapped function was called without arguments; its first "
                "argument must be the model whose sown values are captured."
            )
        call = fn
        installed = _install(module, var_types, init)
        patched: list[type] = []
        try:
            if method_outputs is not None:
                patched = _patch({type(m) for _, m in iter_modules(module)}, method_outputs)
                if inspect.ismethod(fn) and owner is not None:
                    call = getattr(owner, fn.__name__, fn)  # the instrumented version
            result = call(*args, **kwargs)
            captured = _collect(module, var_types)
        finally:
            _unpatch(patched)
            _restore(installed)
        if not var_types:
            return result
        states = split_state(captured, *var_types)
        return (result, states) if len(var_types) == 1 else (result, *states)

    if not isinstance(fn, Module):
        functools.update_wrapper(wrapper, fn)
    return wrapper
