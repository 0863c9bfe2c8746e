"""The reference's ``nnx.bridge.interop``: submodules of the other kind in a bridge Module."""

from refax.nnx.bridge._interop import linen_in_bridge_mdl as linen_in_bridge_mdl
from refax.nnx.bridge._interop import nnx_in_bridge_mdl as nnx_in_bridge_mdl
