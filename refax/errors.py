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
    "TransformStructureError",
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

    DOCS = (
        "https://flax.readthedocs.io/en/latest/api_reference/flax.errors.html"
        "#flax.errors.TraceContextError"
    )

    @classmethod
    def for_object(cls, obj: object) -> TraceContextError:
        """The error for mutating the Object ``obj``: the documented message, plus a note with
        the fix.

        ``str(error)`` is exactly the message the documented API prints; the fix is attached
        as an exception note, which tracebacks show.
        """
        return cls._with_note(
            f"Cannot mutate '{type(obj).__name__}' from different trace level ({cls.DOCS})", obj
        )

    @classmethod
    def for_variable(cls, var: object) -> TraceContextError:
        """Like :meth:`for_object`, for the Variable ``var`` (the wording the transforms guide
        records for Variables)."""
        return cls._with_note(
            f"Cannot mutate {type(var).__name__} from a different trace level ({cls.DOCS})", var
        )

    @classmethod
    def _with_note(cls, message: str, obj: object) -> TraceContextError:
        error = cls(message)
        error.add_note(
            f"The {type(obj).__name__} was created outside the current JAX transform and "
            "captured by closure. Pass the object that holds it as an argument to the "
            "transformed function instead."
        )
        return error


class ImmutableVariableError(RefaxError, ValueError):
    """A Variable that holds no mutable state was written to."""


class GraphStructureError(RefaxError, ValueError):
    """A GraphDef and the States given to it do not fit together."""


class TransformStructureError(GraphStructureError, TypeError):
    """A lifted transform needs an invariant structure that the function did not keep.

    ``cond``/``switch`` branches must return the same output structure and leave their operands
    in the same graph structure; a loop body must return its carry with the structure (and the
    same objects) it received. Subclasses ``TypeError`` too, which JAX raises for the plain
    pytree version of the same mistake.
    """


class FilterError(RefaxError, ValueError):
    """Filters did not partition the state as required (e.g. a non-exhaustive ``split``)."""


class UnhashableStaticError(RefaxError, TypeError):
    """A static attribute (one that goes into the GraphDef) is not hashable."""
