"""``nnx.metrics``: the reference exposes its training metrics module under this name too."""

from refax.training.metrics import *  # noqa: F403
from refax.training.metrics import __all__ as __all__  # noqa: F401
