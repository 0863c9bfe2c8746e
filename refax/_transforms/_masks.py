"""Splitting flat lists of leaves in two by a mask, and joining them back.

Transforms hand JAX some leaves in one group and the rest in another (donated and kept
buffers for ``jit``, differentiated and other leaves for ``grad``/``vjp``/``custom_vjp``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refax._transforms._prefix import arg_owners


def split_by_mask(mask: Sequence[bool], xs: Sequence[Any]) -> tuple[list, list]:
    """``(selected, rest)``: the items where ``mask`` is true, and the others, in order."""
    if not any(mask):
        return [], list(xs)
    return [x for m, x in zip(mask, xs) if m], [x for m, x in zip(mask, xs) if not m]


def interleave(mask: Sequence[bool], selected: Sequence[Any], rest: Sequence[Any]) -> list:
    """Inverse of :func:`split_by_mask`."""
    if not selected:
        return list(rest)
    it_s, it_r = iter(selected), iter(rest)
    return [next(it_s) if m else next(it_r) for m in mask]


def fill(mask: Sequence[bool], selected: Sequence[Any], base: Sequence[Any]) -> list:
    """``base`` (a full-length list) with the masked positions taken from ``selected``."""
    it = iter(selected)
    return [next(it) if m else b for m, b in zip(mask, base)]


def donation_masks(
    inputs: Any, args: tuple, kwargs: dict, argnums: tuple, argnames: tuple
) -> tuple[tuple, tuple]:
    """Which state values and other leaves belong to donated arguments."""
    donated_args = {i % len(args) if i < 0 else i for i in argnums if -len(args) <= i < len(args)}
    donated = [o in donated_args or o in argnames for o in arg_owners(inputs, args, kwargs)]
    other_mask = tuple(d and inputs.other[i] is not None for i, d in enumerate(donated))
    node_donated = [donated[p] for p in inputs.node_pos]
    value_mask = tuple(node_donated[path[0]] for path in inputs.walk.paths)
    return value_mask, other_mask
