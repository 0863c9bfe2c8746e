"""The reference's ``nnx.graphlib`` (also ``nnx.graph``): the graph functions (refax/_graph)."""

from refax._graph import *  # noqa: F403
from refax._graph import __all__ as __all__  # noqa: F401
