"""The reference's ``nnx.variablelib``: Variables and metadata (refax/_variables.py)."""

from refax._variables import *  # noqa: F403
from refax._variables import __all__ as __all__  # noqa: F401
