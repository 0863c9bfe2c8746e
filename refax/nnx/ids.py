"""The reference's ``nnx.ids``: unique identifiers (refax/_ids.py)."""

from refax._ids import *  # noqa: F403
from refax._ids import __all__ as __all__  # noqa: F401
