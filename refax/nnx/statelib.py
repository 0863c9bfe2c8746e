"""The reference's ``nnx.statelib``: State and FlatState (refax/_statelib.py)."""

from refax._statelib import *  # noqa: F403
from refax._statelib import __all__ as __all__  # noqa: F401
