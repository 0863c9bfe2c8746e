"""The reference's ``nnx.bridge.wrappers``: ``ToNNX``, ``ToLinen`` and helpers."""

from refax.nnx.bridge._functional import Functional as Functional
from refax.nnx.bridge._functional import functional as functional
from refax.nnx.bridge._wrappers import ToLinen as ToLinen
from refax.nnx.bridge._wrappers import ToNNX as ToNNX
from refax.nnx.bridge._wrappers import lazy_init as lazy_init
from refax.nnx.bridge._wrappers import linen_rngs_dict as linen_rngs_dict
from refax.nnx.bridge._wrappers import to_linen as to_linen
