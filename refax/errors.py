"""Error classes raised by refax.

Every message states what went wrong, names the offending object or path, then says how to fix
it. Each class subclasses the built-in exception it refines, so existing ``except ValueError``
clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "RefaxError",
    "TraceContextError",
    "ImmutableVariableError",
    "GraphStructureError",
    "FilterError",
    "UnhashableStaticError",
]


class RefaxError(Exception):
    """Base class of every refax-specific error."""


class TraceContextError(RefaxError, RuntimeError):
    """An Object or Variable was mutated from a JAX trace other than the one it was created in.

    This happens when a module is captured by closure inside a transform (``nnx.jit``, ...):
    pass it as an argument to the transformed function instead.
    """


class ImmutableVariableError(RefaxError, ValueError):
    """A Variable that holds no mutable state was written to."""


class GraphStructureError(RefaxError, ValueError):
    """A GraphDef and the States given to it do not fit together."""


class FilterError(RefaxError, ValueError):
    """Filters did not partition the state as required (e.g. a non-exhaustive ``split``)."""


class UnhashableStaticError(RefaxError, TypeError):
    """A static attribute (one that goes into the GraphDef) is not hashable."""
