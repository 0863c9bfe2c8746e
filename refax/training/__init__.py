"""Training utilities: Optimizer (optax), and later metrics, EMA and checkpointing."""

from refax.training import optimizer as optimizer
from refax.training.optimizer import ModelAndOptimizer as ModelAndOptimizer
from refax.training.optimizer import OptArray as OptArray
from refax.training.optimizer import Optimizer as Optimizer
from refax.training.optimizer import OptState as OptState
from refax.training.optimizer import OptVariable as OptVariable
