"""The reference's ``nnx.training.ema`` (refax/training/ema.py)."""

from refax.training.ema import *  # noqa: F403
from refax.training.ema import __all__ as __all__  # noqa: F401
