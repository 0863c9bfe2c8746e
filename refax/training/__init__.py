"""Training utilities: Optimizer (optax), and later metrics, EMA and checkpointing."""

from refax.training import checkpoint as checkpoint
from refax.training import ema as ema
from refax.training import metrics as metrics
from refax.training import optimizer as optimizer
from refax.training.ema import EMA as EMA
from refax.training.metrics import Metric as Metric
from refax.training.metrics import MultiMetric as MultiMetric
from refax.training.optimizer import ModelAndOptimizer as ModelAndOptimizer
from refax.training.optimizer import OptArray as OptArray
from refax.training.optimizer import Optimizer as Optimizer
from refax.training.optimizer import OptState as OptState
from refax.training.optimizer import OptVariable as OptVariable
