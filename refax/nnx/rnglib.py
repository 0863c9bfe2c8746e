"""The reference's ``nnx.rnglib``: Rngs and streams (refax/_rngs.py)."""

from refax._rngs import *  # noqa: F403
from refax._rngs import __all__ as __all__  # noqa: F401
