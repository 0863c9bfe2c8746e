"""Trace-level bookkeeping and the global structure epoch.

Every Object and Variable remembers the JAX trace it was created in (``TraceState``); mutating
it from another trace raises ``TraceContextError``. The *structure epoch* is a process-wide
counter bumped by every structural change to any Object (attribute added, deleted or rebound,
Variable metadata changed). Caches of graph walks are valid while the epoch is unchanged.
"""

from __future__ import annotations

from jax._src import core as _jax_core

_get_opaque = _jax_core.get_opaque_trace_state


_LAST = [None]


def current_trace():
    """Returns an opaque, comparable token for the JAX trace currently active.

    Equal consecutive tokens are interned (the previous object is returned), so most objects
    made under one trace share one token and checks can compare identity first.
    """
    token = _get_opaque(convention="flax")
    last = _LAST[0]
    if last is not None and token == last:
        return last
    _LAST[0] = token
    return token


class _Epoch:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


EPOCH = _Epoch()


def bump_epoch() -> None:
    """Records that some object graph changed structure (invalidates cached graph walks)."""
    EPOCH.value += 1
