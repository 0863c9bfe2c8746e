"""``from refax import nnx``: the same flat API as ``import refax``, for ported code."""

from refax import *  # noqa: F403
