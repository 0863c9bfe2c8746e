"""refax.typing: the type aliases user code imports to annotate layers and parameter trees."""

import typing

import flax.typing as reference_typing
import jax
import jax.numpy as jnp
import pytest

from refax import nn
from refax import typing as rt
from refax._rngs import Rngs

# The reference's type aliases that user code annotates with (its run-time helpers, such as
# sentinels, config contexts and Linen's lifting markers, are not type aliases).
ALIASES = [
    "Array",
    "PRNGKey",
    "RNGSequences",
    "Dtype",
    "Shape",
    "Key",
    "Path",
    "PathParts",
    "Leaf",
    "PrecisionLike",
    "DotGeneralT",
    "ConvGeneralDilatedT",
    "EinsumT",
    "PaddingLike",
    "LaxPadding",
    "Initializer",
    "Collection",
    "MutableCollection",
    "VariableDict",
    "FrozenVariableDict",
    "MutableVariableDict",
    "PRNGFoldable",
    "Axis",
    "Axes",
    "LogicalNames",
    "AxisName",
    "LogicalRules",
    "ArrayPytree",
    "LogicalPartitionSpec",
    "LogicalPartitionSpecPytree",
    "PartitionSpecPytree",
    "Sharding",
    "ShapeDtype",
    "PromoteDtypeFn",
]


@pytest.mark.parametrize("name", ALIASES)
def test_reference_alias_exists(name):
    assert hasattr(reference_typing, name)  # the list names real reference aliases
    assert getattr(rt, name) is not None


def test_padding_aliases_cover_every_padding_form():
    padding_forms = set(typing.get_args(rt.PaddingLike))
    assert {str, int} <= padding_forms
    assert str in typing.get_args(rt.LaxPadding)
    for padding in ["SAME", 2, [1, (0, 2)]]:
        pads = nn.conv.canonicalize_padding(padding, 2)
        assert isinstance(pads, str) or all(len(p) == 2 for p in pads)


def test_precision_like_accepts_names_enums_and_pairs():
    args = typing.get_args(rt.PrecisionLike)
    assert type(None) in args and str in args and jax.lax.Precision in args
    assert tuple[jax.lax.Precision, jax.lax.Precision] in args


def test_layer_annotations_resolve():
    # Layers annotate with these aliases under postponed evaluation: every hint must resolve.
    for layer in [nn.Conv, nn.ConvTranspose, nn.Linear, nn.LinearGeneral, nn.Einsum]:
        hints = typing.get_type_hints(layer.__init__, localns={"Rngs": Rngs})
        assert hints["dtype"] == rt.Dtype | None
    hints = typing.get_type_hints(nn.Conv.__init__, localns={"Rngs": Rngs})
    assert hints["padding"] == rt.PaddingLike
    assert hints["conv_general_dilated"] == rt.ConvGeneralDilatedT
    assert nn.conv.PaddingLike is rt.PaddingLike and nn.conv.LaxPadding is rt.LaxPadding


def test_protocols_describe_refax_callables():
    # Structural types: refax's own functions fit them (checked here by calling them as such).
    promote: rt.PromoteDtypeFn = nn.dtypes.promote_dtype
    x, b = promote((jnp.ones(2, jnp.int32), None), dtype=jnp.float16)
    assert x.dtype == jnp.float16 and b is None
    init: rt.Initializer = nn.initializers.zeros_init()
    assert init(jax.random.key(0), (2, 3), jnp.float32).shape == (2, 3)
    value: rt.ShapeDtype = jax.ShapeDtypeStruct((2,), jnp.float32)
    assert tuple(value.shape) == (2,) and value.dtype == jnp.float32
