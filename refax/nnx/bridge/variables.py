"""The reference's ``nnx.bridge.variables``: Variables across the Linen boundary."""

from refax.nnx.bridge._variables import LINEN_BOX as LINEN_BOX
from refax.nnx.bridge._variables import NNXMeta as NNXMeta
from refax.nnx.bridge._variables import linen_collection as linen_collection
from refax.nnx.bridge._variables import to_linen_var as to_linen_var
from refax.nnx.bridge._variables import to_nnx_var as to_nnx_var
from refax.nnx.bridge._variables import with_partitioning as with_partitioning
