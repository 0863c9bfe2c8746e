"""The reference's ``nnx.transforms`` package: the lifted transforms, and ``general`` (hand
lifting with ``split_inputs`` / ``merge_inputs``)."""

from refax._transforms._autodiff import *  # noqa: F403
from refax._transforms._checkify import *  # noqa: F403
from refax._transforms._control import *  # noqa: F403
from refax._transforms._eval_shape import *  # noqa: F403
from refax._transforms._jit import *  # noqa: F403
from refax._transforms._remat import *  # noqa: F403
from refax._transforms._scan import *  # noqa: F403
from refax._transforms._vmap import *  # noqa: F403
from refax.nnx.transforms import general as general
