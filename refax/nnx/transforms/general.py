"""The reference's ``nnx.transforms.general``: lifting any JAX transform by hand."""

from refax._transforms._general import merge_inputs as merge_inputs
from refax._transforms._general import split_inputs as split_inputs

__all__ = ["merge_inputs", "split_inputs"]
