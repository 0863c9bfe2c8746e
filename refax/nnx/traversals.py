"""The reference's ``nnx.traversals``: flattening nested mappings (refax/_traversals.py)."""

from refax._traversals import *  # noqa: F403
from refax._traversals import __all__ as __all__  # noqa: F401
