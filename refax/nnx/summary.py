"""The reference's ``nnx.summary``: ``tabulate`` and its row type (refax/training/summary.py)."""

from refax.training.summary import *  # noqa: F403
from refax.training.summary import __all__ as __all__  # noqa: F401
