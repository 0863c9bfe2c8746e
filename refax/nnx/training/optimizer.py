"""The reference's ``nnx.training.optimizer`` (refax/training/optimizer.py)."""

from refax.training.optimizer import *  # noqa: F403
from refax.training.optimizer import __all__ as __all__  # noqa: F401
