"""Axis metadata of Variables under the mapping transforms (``vmap``, ``pmap``, ``scan``).

``transform_metadata={nnx.PARTITION_NAME: name, key: field, ...}`` makes a mapping transform
remove the mapped axis from a Variable's sharding names (and from each tuple metadata ``key``)
while the function runs, and insert ``name`` (and ``field``) at the output axis afterwards;
the Variable type's own ``remove_axis`` / ``add_axis`` callbacks run at the same points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refax._transforms._prefix import PARTITION_NAME
from refax._variables import Variable

_SHARDING_KEY = "out_sharding"


def partition_name(transform_metadata: Mapping[str, Any] | None) -> Any:
    """The ``PARTITION_NAME`` entry of ``transform_metadata`` (None when absent)."""
    return transform_metadata.get(PARTITION_NAME) if transform_metadata else None


def other_fields(transform_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``transform_metadata`` entries besides ``PARTITION_NAME``."""
    return {k: v for k, v in (transform_metadata or {}).items() if k != PARTITION_NAME}


def remove_axis(var: Variable, axis: int, name: Any = None, extra: Mapping = {}) -> None:  # noqa: B006
    """Inside the transform: ``var`` lost its mapped ``axis``."""
    var.remove_axis(axis, name)  # the Variable type's own callback (hooks, overrides)
    _axis_fields(var, axis, extra, insert=False)
    names = var._var_metadata.get(_SHARDING_KEY)
    if isinstance(names, tuple) and -len(names) <= axis < len(names):
        axis %= len(names)
        names = names[:axis] + names[axis + 1 :]
        var._var_metadata = {**var._var_metadata, _SHARDING_KEY: names}
        var._frozen = None


def insert_axis(var: Variable, axis: int, name: Any, extra: Mapping = {}) -> None:  # noqa: B006
    """Leaving the transform: ``var`` gains the mapped ``axis`` named ``name``."""
    _axis_fields(var, axis, extra, insert=True)
    names = var._var_metadata.get(_SHARDING_KEY)
    if isinstance(names, tuple):
        axis = axis if axis >= 0 else len(names) + 1 + axis
        names = (*names[:axis], name, *names[axis:])
        var._var_metadata = {**var._var_metadata, _SHARDING_KEY: names}
        var._frozen = None
    var.add_axis(axis, name)


def _axis_fields(var: Variable, axis: int, extra: Mapping, *, insert: bool) -> None:
    """Inserts (removes) ``extra[key]`` at ``axis`` of each tuple metadata ``key`` of ``var``."""
    for key, field in extra.items():
        t = var._var_metadata.get(key)
        if isinstance(t, tuple) and t:
            if insert:
                i = axis if axis >= 0 else len(t) + 1 + axis
                t = (*t[:i], *(None,) * (i - len(t)), field, *t[i:])
            elif not -len(t) <= axis < len(t) or t[axis] != field:
                raise ValueError(f"Expected {field!r} at index {axis} of {key}={t!r}.")
            else:
                i = axis % len(t)
                t = t[:i] + t[i + 1 :]
            var.set_metadata(key, t)
