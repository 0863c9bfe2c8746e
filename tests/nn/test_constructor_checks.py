"""Layer constructors reject invalid arguments up front, naming the layer and the argument.

Bad values raise ``ValueError`` and values of the wrong type ``TypeError``, before any
parameter is drawn; valid edge values (sizes of 1, one group, one head, NumPy integers) are
accepted, as the reference accepts them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs

nn = nnx  # the layers, as users reach them
V, T = ValueError, TypeError
NORMS = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]
CELLS = ["LSTMCell", "OptimizedLSTMCell", "GRUCell", "SimpleCell"]
MHA = nn.MultiHeadAttention
LIN = nn.Linear(2, 2, rngs=Rngs(5))  # wrapped layers, built with their own Rngs
CELL = nn.GRUCell(2, 3, rngs=Rngs(5))


def _norm(name, n, **kw):
    if name == "GroupNorm":
        kw.setdefault("num_groups", 1)
    return lambda r: getattr(nn, name)(n, rngs=r, **kw)


BAD = [
    # Linear: one int per side; tuples are LinearGeneral's
    (lambda r: nn.Linear(0, 3, rngs=r), V, "Linear: in_features must be a positive integer, got 0"),
    (lambda r: nn.Linear(3, -1, rngs=r), V, "Linear: out_features .* got -1"),
    (lambda r: nn.Linear(3.5, 3, rngs=r), T, "Linear: in_features .* 3.5 of type float"),
    (lambda r: nn.Linear(True, 3, rngs=r), T, "Linear: in_features .* type bool"),
    (lambda r: nn.Linear((2, 3), 4, rngs=r), T, "Linear: in_features .* type tuple"),
    (lambda r: nn.Linear(3, None, rngs=r), T, "Linear: out_features"),
    (lambda r: nn.LinearGeneral((2, 0), 3, axis=(-2, -1), rngs=r), V, "LinearGeneral: in_features"),
    (lambda r: nn.LinearGeneral(3, (4, -1), rngs=r), V, "LinearGeneral: out_features"),
    (lambda r: nn.LinearGeneral(3, 2.0, rngs=r), T, "LinearGeneral: out_features"),
    (lambda r: nn.LinearGeneral(3, 4, axis=1.0, rngs=r), T, "LinearGeneral: axis"),
    (
        lambda r: nn.LinearGeneral(3, 4, batch_axis={0: 0}, rngs=r),
        V,
        r"LinearGeneral: batch_axis\[0\]",
    ),
    (lambda r: nn.LinearGeneral(3, 4, batch_axis=(0,), rngs=r), T, "LinearGeneral: batch_axis"),
    (lambda r: nn.Einsum("ab,bc->ac", (3, 0), rngs=r), V, "Einsum: kernel_shape .* got \\(3, 0\\)"),
    (lambda r: nn.Einsum("ab,bc->ac", 3, rngs=r), T, "Einsum: kernel_shape"),
    (lambda r: nn.Einsum("ab,bc->ac", (3, 4), (0,), rngs=r), V, "Einsum: bias_shape"),
    (lambda r: nn.Einsum("btd,dnh->btnh", (8, 2), rngs=r), V, "Einsum: kernel_shape .* rank 2"),
    (lambda r: nn.Einsum(None, (3, 4), rngs=r), T, "Einsum: einsum_str must be a string"),
    (lambda r: nn.Embed(0, 3, rngs=r), V, "Embed: num_embeddings .* got 0"),
    (lambda r: nn.Embed(3, -2, rngs=r), V, "Embed: features .* got -2"),
    (lambda r: nn.Embed(3.0, 2, rngs=r), T, "Embed: num_embeddings"),
    # convolutions
    (lambda r: nn.Conv(0, 4, 3, rngs=r), V, "Conv: in_features .* got 0"),
    (lambda r: nn.Conv(3, 0, 3, rngs=r), V, "Conv: out_features .* got 0"),
    (lambda r: nn.Conv(3, 4, (3, -1), rngs=r), V, "Conv: kernel_size .* got \\(3, -1\\)"),
    (lambda r: nn.Conv(3, 4, 2.5, rngs=r), T, "Conv: kernel_size"),
    (lambda r: nn.Conv(3, 4, 3, strides=0, rngs=r), V, "Conv: strides .* got 0"),
    (lambda r: nn.Conv(3, 4, (3, 3), strides=(1, 1, 1), rngs=r), V, "Conv: strides .* 2 positive"),
    (lambda r: nn.Conv(3, 4, 3, kernel_dilation=0, rngs=r), V, "Conv: kernel_dilation"),
    (lambda r: nn.Conv(3, 4, 3, input_dilation=(-1,), rngs=r), V, "Conv: input_dilation"),
    (lambda r: nn.Conv(4, 4, 3, feature_group_count=0, rngs=r), V, "Conv: feature_group_count"),
    (lambda r: nn.Conv(3, 4, 3, padding="FULL", rngs=r), V, "Conv: unknown padding 'FULL'"),
    (lambda r: nn.ConvTranspose(0, 4, 3, rngs=r), V, "ConvTranspose: in_features"),
    (lambda r: nn.ConvTranspose(3, 4, 0, rngs=r), V, "ConvTranspose: kernel_size"),
    (lambda r: nn.ConvTranspose(3, 4, 3, strides=(2, 2), rngs=r), V, "ConvTranspose: strides"),
    (
        lambda r: nn.ConvTranspose(3, 4, 3, kernel_dilation=-1, rngs=r),
        V,
        "ConvTranspose: kernel_dil",
    ),
    # attention
    (lambda r: MHA(0, 4, rngs=r), V, "MultiHeadAttention: num_heads .* got 0"),
    (lambda r: MHA(-2, 4, rngs=r), V, "MultiHeadAttention: num_heads .* got -2"),
    (lambda r: MHA(2.0, 4, rngs=r), T, "MultiHeadAttention: num_heads"),
    (lambda r: MHA(2, 0, rngs=r), V, "MultiHeadAttention: in_features"),
    (
        lambda r: MHA(2, 4, qkv_features=5, rngs=r),
        V,
        r"MultiHeadAttention: qkv_features \(5\) must",
    ),
    (lambda r: MHA(2, 5, rngs=r), V, r"MultiHeadAttention: qkv_features \(5\) .*num_heads \(2\)"),
    (lambda r: MHA(3, 6, qkv_features=0, rngs=r), V, "MultiHeadAttention: qkv_features .* got 0"),
    (lambda r: MHA(2, 4, out_features=0, rngs=r), V, "MultiHeadAttention: out_features"),
    (lambda r: MHA(2, 4, in_kv_features=-1, rngs=r), V, "MultiHeadAttention: in_kv_features"),
    (lambda r: MHA(4, 8, num_kv_heads=0, rngs=r), V, "MultiHeadAttention: num_kv_heads .* got 0"),
    (lambda r: MHA(2, 4, dropout_rate=1.0, rngs=r), V, "MultiHeadAttention: dropout_rate"),
    # normalization
    *[(_norm(name, 0), V, f"{name}: num_features .* got 0") for name in NORMS],
    *[(_norm(name, 2.0), T, f"{name}: num_features") for name in NORMS],
    *[(_norm(name, 4, epsilon=-1e-5), V, f"{name}: epsilon .* non-negative") for name in NORMS],
    *[(_norm(name, 4, epsilon=None), T, f"{name}: epsilon") for name in NORMS],
    (_norm("BatchNorm", 4, momentum=1.5), V, r"BatchNorm: momentum must be in \[0, 1\], got 1.5"),
    (_norm("BatchNorm", 4, momentum=-0.1), V, "BatchNorm: momentum"),
    (_norm("GroupNorm", 6, num_groups=4), V, "GroupNorm: num_groups must divide num_features"),
    (_norm("GroupNorm", 6, num_groups=-3), V, "GroupNorm: num_groups must be a positive"),
    (_norm("GroupNorm", 6, num_groups=2.0), T, "GroupNorm: num_groups"),
    (_norm("GroupNorm", 6, num_groups=None, group_size=4), V, "GroupNorm: group_size must divide"),
    (_norm("GroupNorm", 6, num_groups=None, group_size=1.5), T, "GroupNorm: group_size"),
    (_norm("GroupNorm", 6, num_groups=None), V, "GroupNorm: either `num_groups` or `group_size`"),
    (_norm("GroupNorm", 6, num_groups=2, group_size=3), V, "GroupNorm: either `num_groups` or"),
    (lambda r: nn.WeightNorm(LIN, epsilon=-1.0, rngs=r), V, "WeightNorm: epsilon .* got -1.0"),
    (lambda r: nn.SpectralNorm(LIN, n_steps=-1, rngs=r), V, "SpectralNorm: n_steps .* got -1"),
    (lambda r: nn.SpectralNorm(LIN, n_steps=1.5, rngs=r), T, "SpectralNorm: n_steps"),
    (lambda r: nn.SpectralNorm(LIN, epsilon=-1e-9, rngs=r), V, "SpectralNorm: epsilon"),
    # dropout, LoRA, recurrent
    (lambda r: nn.Dropout(1.0, rngs=r), V, r"Dropout: rate must be in \[0, 1\), got 1.0"),
    (lambda r: nn.Dropout("0.5", rngs=r), T, "Dropout: rate .* type str"),
    (lambda r: nn.Dropout(0.5, broadcast_dims=1, rngs=r), T, "Dropout: broadcast_dims"),
    (lambda r: nn.LoRA(3, 0, 4, rngs=r), V, "LoRA: lora_rank .* got 0"),
    (lambda r: nn.LoRA(0, 2, 4, rngs=r), V, "LoRA: in_features"),
    (lambda r: nn.LoRA(3, 2, -4, rngs=r), V, "LoRA: out_features"),
    (lambda r: nn.LoRALinear(3, 4, lora_rank=0, rngs=r), V, "LoRALinear: lora_rank .* got 0"),
    (lambda r: nn.LoRALinear(3, 4, lora_rank=2.0, rngs=r), T, "LoRALinear: lora_rank"),
    (lambda r: nn.LoRALinear(0, 4, lora_rank=2, rngs=r), V, "LoRALinear: in_features"),
    *[(lambda r, c=c: getattr(nn, c)(0, 4, rngs=r), V, f"{c}: in_features") for c in CELLS],
    *[(lambda r, c=c: getattr(nn, c)(3, 0, rngs=r), V, f"{c}: hidden_features") for c in CELLS],
    *[(lambda r, c=c: getattr(nn, c)(3, 2.0, rngs=r), T, f"{c}: hidden_features") for c in CELLS],
    (lambda r: nn.RNN(CELL, unroll=0), V, "RNN: unroll .* got 0"),
    (lambda r: nn.RNN(CELL, unroll=2.0), T, "RNN: unroll"),
    (lambda r: nn.RNN(CELL, state_axes=[...]), T, "RNN: state_axes"),
]


@pytest.mark.parametrize("make,error,match", BAD)
def test_bad_constructor_arguments_are_rejected_before_any_parameter(make, error, match):
    rngs = Rngs(params=0, dropout=1, carry=2)
    with pytest.raises(error, match=match) as info:
        make(rngs)
    assert type(info.value) is error  # ValueError for values, TypeError for types, not both
    # raised before any key was drawn, so before any parameter was created
    counts = [int(rngs[s].count[...]) for s in ("params", "dropout", "carry")]
    assert counts == [0, 0, 0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: nnx.max_pool(x, (0,)), "pool: window_shape .* got \\(0,\\)"),
        (lambda x: nnx.avg_pool(x, (2,), strides=(0,)), "pool: strides .* got \\(0,\\)"),
        (lambda x: nnx.min_pool(x, (2,), strides=-1), "pool: strides"),
        (lambda x: nnx.max_pool(x, (2,), strides=0), "pool: strides"),  # not "0 means 1"
    ],
)
def test_pooling_rejects_non_positive_windows_and_strides(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((1, 4, 2)))


# Valid edge values, built by refax and (the same arguments) by the reference.
GOOD = [
    ("Linear", (1, 1), {}),
    ("Linear", (np.int64(3), np.int32(2)), {}),
    ("LinearGeneral", ((2, 3), (4, 1)), dict(axis=(-2, -1), batch_axis={0: 1})),
    ("Einsum", ("...d,dh->...h", (1, 1), (1,)), {}),
    ("Embed", (1, 1), {}),
    ("Conv", (1, 1, 1), dict(strides=None, kernel_dilation=None, input_dilation=(1,))),
    ("Conv", (4, 2, (1, 1)), dict(strides=(2, 1), feature_group_count=2, padding=((0, 1), 2))),
    ("Conv", (2, 2, 3), dict(padding="CAUSAL")),
    ("ConvTranspose", (1, 1, (1, 1)), dict(strides=(2, 1), padding="CIRCULAR")),
    ("ConvTranspose", (1, 1, 1), dict(padding=-1)),  # explicit padding may crop
    ("MultiHeadAttention", (1, 3), {}),
    ("MultiHeadAttention", (2, 4), dict(out_features=3, num_kv_heads=1, in_kv_features=1)),
    ("MultiHeadAttention", (4, 8), dict(qkv_features=4, dropout_rate=0.0)),
    ("GroupNorm", (4,), dict(num_groups=1)),
    ("GroupNorm", (4,), dict(num_groups=None, group_size=4)),
    ("GroupNorm", (3,), dict(num_groups=3)),
    ("BatchNorm", (1,), dict(momentum=0.0, epsilon=0.0)),
    ("BatchNorm", (1,), dict(momentum=1.0)),
    ("LayerNorm", (1,), dict(epsilon=0)),
    ("RMSNorm", (np.int64(2),), {}),
    ("InstanceNorm", (1,), {}),
    ("LoRA", (1, 1, 1), {}),
    ("LoRALinear", (1, 1), dict(lora_rank=1)),
    ("Dropout", (0.0,), dict(broadcast_dims=[0, -1])),
    ("LSTMCell", (1, 1), {}),
    ("OptimizedLSTMCell", (1, 1), {}),
    ("GRUCell", (1, 1), {}),
    ("SimpleCell", (1, 1), {}),
]


@pytest.mark.parametrize("name,args,kwargs", GOOD)
def test_valid_edge_values_are_accepted_like_the_reference(name, args, kwargs):
    getattr(F, name)(*args, **kwargs, rngs=F.Rngs(0))
    assert isinstance(getattr(nn, name)(*args, **kwargs, rngs=Rngs(0)), nnx.Module)


def test_valid_edge_values_of_wrappers_rnn_and_pooling():
    nn.SpectralNorm(nn.Linear(2, 2, rngs=Rngs(0)), n_steps=0, epsilon=0.0, rngs=Rngs(1))
    nn.WeightNorm(nn.Linear(2, 2, rngs=Rngs(0)), epsilon=0, rngs=Rngs(1))
    for unroll in (1, 3, True, False):
        nn.RNN(nn.GRUCell(2, 3, rngs=Rngs(0)), unroll=unroll)
    x = jnp.arange(8.0).reshape(1, 4, 2)
    for strides in (None, (), 1, (1,)):
        assert nnx.max_pool(x, (1,), strides=strides).shape == (1, 4, 2)
    assert nnx.avg_pool(x, (4,), strides=(np.int64(2),)).shape == (1, 1, 2)


def test_a_scalar_integer_array_counts_as_an_integer():
    layer = nn.Linear(jnp.int32(3), 2, rngs=Rngs(0))
    assert layer.kernel.shape == (3, 2)
    with pytest.raises(ValueError, match="Linear: in_features .* got 0"):
        nn.Linear(jnp.int32(0), 2, rngs=Rngs(0))
    with pytest.raises(TypeError, match="Linear: in_features"):
        nn.Linear(jnp.float32(3), 2, rngs=Rngs(0))


def test_checks_work_under_eval_shape_and_transforms():
    abstract = nnx.eval_shape(lambda: nn.Conv(3, 4, (3, 3), strides=2, rngs=Rngs(0)))
    assert abstract.kernel.shape == (3, 3, 3, 4)
    with pytest.raises(ValueError, match="Conv: strides"):
        nnx.eval_shape(lambda: nn.Conv(3, 4, (3, 3), strides=(2, 0), rngs=Rngs(0)))
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = nnx.vmap(lambda k: nn.GroupNorm(4, num_groups=2, rngs=Rngs(k)))(keys)
    assert stacked.scale.shape == (3, 4)
    with pytest.raises(ValueError, match="GroupNorm: num_groups must divide"):
        nnx.vmap(lambda k: nn.GroupNorm(4, num_groups=3, rngs=Rngs(k)))(keys)
    # A traced size can never give a static shape: it is refused as such, never converted.
    with pytest.raises(TypeError, match="Linear: out_features .* traced value"):
        jax.jit(lambda n: nn.Linear(2, n, rngs=Rngs(0)).kernel[...])(3)
    # A traced rate stays accepted (it cannot be range-checked).
    assert jax.jit(lambda rate: nn.Dropout(rate).rate * 2)(0.25) == 0.5
