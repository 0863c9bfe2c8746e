"""The reference's ``nnx.training`` package: optimizer, metrics and EMA (refax/training/)."""

from refax.nnx.training import ema as ema
from refax.nnx.training import metrics as metrics
from refax.nnx.training import optimizer as optimizer
from refax.training import *  # noqa: F403
