"""``from refax import nnx``: the whole public API under the name the documented API uses.

Code written for the reference NNX implementation runs after one changed import line
(``from refax import nnx``). The flat namespace is refax's own (``import refax as nnx`` works
too); the submodules here are thin aliases mapping the reference's import paths
(``from flax.nnx import graphlib``, ``nnx.statelib.State``, ...) onto refax's modules, whose
implementation stays where refax's design puts it.
"""

from refax import *  # noqa: F403
from refax.nnx import compat as compat
from refax.nnx import extract as extract
from refax.nnx import filterlib as filterlib
from refax.nnx import graphlib as graphlib
from refax.nnx import helpers as helpers
from refax.nnx import ids as ids
from refax.nnx import module as module
from refax.nnx import pytreelib as pytreelib
from refax.nnx import rnglib as rnglib
from refax.nnx import statelib as statelib
from refax.nnx import summary as summary
from refax.nnx import training as training
from refax.nnx import transforms as transforms
from refax.nnx import traversals as traversals
from refax.nnx import variablelib as variablelib

graph = graphlib  # the reference's older name of the same module


def __getattr__(name: str):  # ``nnx.bridge`` needs Flax's Linen: imported on first use only
    if name == "bridge":
        import importlib

        return importlib.import_module("refax.nnx.bridge")
    raise AttributeError(f"module 'refax.nnx' has no attribute {name!r}")
