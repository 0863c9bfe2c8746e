"""The reference's ``nnx.pytreelib`` (also ``nnx.object``): Pytree, Object and the data/static
markers (refax/_object.py)."""

from refax._object import *  # noqa: F403
from refax._object import __all__ as __all__  # noqa: F401
