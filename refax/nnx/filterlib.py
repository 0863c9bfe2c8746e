"""The reference's ``nnx.filterlib``: filters (refax/_filters.py)."""

from refax._filters import *  # noqa: F403
from refax._filters import __all__ as __all__  # noqa: F401
