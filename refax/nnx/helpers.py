"""The reference's ``nnx.helpers``: Dict, List, Sequential and TrainState."""

from refax._containers import Dict as Dict
from refax._containers import List as List
from refax.nn.sequential import Sequential as Sequential
from refax.training._train_state import TrainState as TrainState

__all__ = ["Dict", "List", "Sequential", "TrainState"]
