"""Static arguments (``static_argnums`` / ``static_argnames``) of ``jit``, ``remat`` and
``make_jaxpr``: taken out of the call before the arguments are split, carried as hashable
data in the call's settings, and put back before the user function runs."""

from __future__ import annotations

import inspect
from typing import Any

StaticArgs = tuple  # ((index, value), ...), ((name, value), ...)); () when there are none


def as_tuple(x: Any) -> tuple:
    """``None`` -> ``()``, one int or name -> a 1-tuple, a sequence -> a tuple."""
    if x is None:
        return ()
    if isinstance(x, (int, str)):
        return (x,)
    return tuple(x)


def infer_static(
    signature: inspect.Signature | None, argnums: tuple, argnames: tuple
) -> tuple[tuple, tuple]:
    """Completes ``static_argnums`` / ``static_argnames`` from each other by the signature
    (as ``jax.jit`` does: a parameter is static whether it is passed by position or name)."""
    if signature is None or not (argnums or argnames):
        return argnums, argnames
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return argnums, argnames
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    n = sum(p.kind in positional for p in params)
    nums, names = list(argnums), list(argnames)
    for i, p in enumerate(params[:n]):
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            if p.name in argnames and i not in nums:
                nums.append(i)
            if (i in argnums or i - n in argnums) and p.name not in names:
                names.append(p.name)
    return tuple(nums), tuple(names)


def extract_static(
    args: tuple, kwargs: dict, argnums: tuple, argnames: tuple, transform: str
) -> tuple[tuple, dict, StaticArgs]:
    """Removes the static arguments: ``(dynamic_args, dynamic_kwargs, static_args)``.

    Raises:
      ValueError: for a static argument that is not hashable.
    """
    if not argnums and not argnames:
        return args, kwargs, ()
    n = len(args)
    nums = tuple(sorted({i % n if i < 0 else i for i in argnums if -n <= i < n}))
    static_pos = tuple((i, args[i]) for i in nums)
    static_kw = tuple((k, kwargs[k]) for k in argnames if k in kwargs)
    for key, v in (*static_pos, *static_kw):
        try:
            hash(v)
        except TypeError:
            raise ValueError(
                f"nnx.{transform}: static argument {key!r} ({v!r} of type {type(v).__name__}) "
                "is not hashable; static arguments must be hashable (use a tuple instead of a "
                "list)."
            ) from None
    args = tuple(a for i, a in enumerate(args) if i not in nums)
    if static_kw:
        kwargs = {k: v for k, v in kwargs.items() if k not in argnames}
    return args, kwargs, (static_pos, static_kw)


def insert_static(args: tuple, kwargs: dict, static_args: StaticArgs) -> tuple[tuple, dict]:
    """Inverse of :func:`extract_static`."""
    if not static_args:
        return args, kwargs
    static_pos, static_kw = static_args
    out = list(args)
    for i, v in static_pos:
        out.insert(i, v)
    return tuple(out), ({**kwargs, **dict(static_kw)} if static_kw else kwargs)
