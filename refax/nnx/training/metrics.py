"""The reference's ``nnx.training.metrics`` (refax/training/metrics.py)."""

from refax.training.metrics import *  # noqa: F403
from refax.training.metrics import __all__ as __all__  # noqa: F401
