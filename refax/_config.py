"""Process-wide defaults for ``graph=`` and ``graph_updates=`` (see ``set_graph_mode``).

Both default to True (graph mode with graph updates, as the spec documents). The environment
variables ``NNX_GRAPH_MODE`` / ``NNX_GRAPH_UPDATES`` (``0``/``false`` to disable) set the
initial values. Each setter works globally, as a context manager, or as a decorator.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off", "")


class _Flag(threading.local):
    def __init__(self, name: str, env: str) -> None:
        self.name = name
        self.stack = [_env_flag(env, True)]


class _FlagSetter:
    """Returned by ``set_graph_mode(v)``: already applied; undone on ``__exit__``."""

    def __init__(self, flag: _Flag, value: bool):
        self._flag = flag
        self._value = value
        self._prev = flag.stack[-1]
        flag.stack[-1] = value

    def __enter__(self) -> _FlagSetter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._flag.stack[-1] = self._prev

    def __call__(self, fn: Callable) -> Callable:
        self._flag.stack[-1] = self._prev  # decorating does not change the global default
        value = self._value
        flag = self._flag

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flag.stack.append(value)
            try:
                return fn(*args, **kwargs)
            finally:
                flag.stack.pop()

        return wrapper


_GRAPH_MODE = _Flag("nnx_graph_mode", "NNX_GRAPH_MODE")
_GRAPH_UPDATES = _Flag("nnx_graph_updates", "NNX_GRAPH_UPDATES")


def _make_setter(flag: _Flag, doc: str):
    def setter(value: bool) -> _FlagSetter:
        if not isinstance(value, bool):
            raise TypeError(f"{flag.name} must be a bool, got {value!r}.")
        return _FlagSetter(flag, value)

    setter.current_value = lambda: flag.stack[-1]  # type: ignore[attr-defined]
    setter.__doc__ = doc
    return setter


set_graph_mode = _make_setter(
    _GRAPH_MODE,
    """Sets the default of ``graph=`` (True: graph mode with shared references).

    Usable globally (``set_graph_mode(False)``), as a context manager, or as a decorator;
    ``set_graph_mode.current_value()`` reads it.
    """,
)
set_graph_updates = _make_setter(
    _GRAPH_UPDATES,
    """Sets the default of ``graph_updates=`` (True: structure changes propagate out).""",
)


def graph_mode_default() -> bool:
    return _GRAPH_MODE.stack[-1]


def graph_updates_default() -> bool:
    return _GRAPH_UPDATES.stack[-1]


def resolve_modes(graph: bool | None, graph_updates: bool | None) -> tuple[bool, bool]:
    """The effective ``(graph, graph_updates)`` of one transform call: ``None`` reads the
    ``set_graph_mode`` / ``set_graph_updates`` default; tree mode (``graph=False``) never
    propagates graph updates."""
    graph = _GRAPH_MODE.stack[-1] if graph is None else graph
    graph_updates = _GRAPH_UPDATES.stack[-1] if graph_updates is None else graph_updates
    return graph, graph and graph_updates


class Config:
    """refax's process-wide options, as attributes (``refax.config``).

    Attributes:
      explain_retraces: log, at every retrace of an ``nnx.jit`` function, what changed since
        its previous trace, by path (a static attribute's value, an added or removed
        attribute, a shape or dtype, a change of sharing). Logged as a warning on the
        ``refax`` logger. Initial value: the environment variable ``REFAX_EXPLAIN_RETRACES``
        (``1`` to enable), else False.

    Example:
      >>> import refax
      >>> refax.config.update("explain_retraces", True)
      >>> refax.config.explain_retraces
      True
      >>> refax.config.explain_retraces = False
    """

    __slots__ = ("explain_retraces",)

    def __init__(self) -> None:
        self.explain_retraces = _env_flag("REFAX_EXPLAIN_RETRACES", False)

    def update(self, name: str, value: Any) -> None:
        """Sets option ``name`` (like ``jax.config.update``)."""
        if name not in self.__slots__:
            raise AttributeError(
                f"refax.config has no option {name!r}; the options are {list(self.__slots__)}."
            )
        setattr(self, name, value)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


config = Config()
