"""Layers, initializers and activation functions (``refax.nn``).

Every layer is a :class:`refax.Module` that creates its parameters eagerly from an ``Rngs``
and is called directly on arrays. The same seed gives the same parameters as the reference
NNX implementation. Submodules: :mod:`~refax.nn.linear`, :mod:`~refax.nn.normalization`,
:mod:`~refax.nn.stochastic`, :mod:`~refax.nn.activations`, :mod:`~refax.nn.initializers`,
:mod:`~refax.nn.dtypes`.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax import nn
  >>> model = nn.Sequential(nn.Linear(3, 4, rngs=Rngs(0)), nn.gelu, nn.LayerNorm(4, rngs=Rngs(0)))
  >>> model(jnp.ones((2, 3))).shape
  (2, 4)
"""

from refax.nn import activations as activations
from refax.nn import attention as attention
from refax.nn import conv as conv
from refax.nn import dtypes as dtypes
from refax.nn import initializers as initializers
from refax.nn import linear as linear
from refax.nn import lora as lora
from refax.nn import normalization as normalization
from refax.nn import pooling as pooling
from refax.nn import recurrent as recurrent
from refax.nn import stochastic as stochastic
from refax.nn import weight_norms as weight_norms
from refax.nn.activations import PReLU as PReLU
from refax.nn.activations import celu as celu
from refax.nn.activations import elu as elu
from refax.nn.activations import gelu as gelu
from refax.nn.activations import glu as glu
from refax.nn.activations import hard_sigmoid as hard_sigmoid
from refax.nn.activations import hard_silu as hard_silu
from refax.nn.activations import hard_swish as hard_swish
from refax.nn.activations import hard_tanh as hard_tanh
from refax.nn.activations import identity as identity
from refax.nn.activations import leaky_relu as leaky_relu
from refax.nn.activations import log_sigmoid as log_sigmoid
from refax.nn.activations import log_softmax as log_softmax
from refax.nn.activations import logsumexp as logsumexp
from refax.nn.activations import one_hot as one_hot
from refax.nn.activations import relu as relu
from refax.nn.activations import relu6 as relu6
from refax.nn.activations import selu as selu
from refax.nn.activations import sigmoid as sigmoid
from refax.nn.activations import silu as silu
from refax.nn.activations import soft_sign as soft_sign
from refax.nn.activations import softmax as softmax
from refax.nn.activations import softplus as softplus
from refax.nn.activations import standardize as standardize
from refax.nn.activations import swish as swish
from refax.nn.activations import tanh as tanh
from refax.nn.attention import MultiHeadAttention as MultiHeadAttention
from refax.nn.attention import combine_masks as combine_masks
from refax.nn.attention import dot_product_attention as dot_product_attention
from refax.nn.attention import dot_product_attention_weights as dot_product_attention_weights
from refax.nn.attention import make_attention_mask as make_attention_mask
from refax.nn.attention import make_causal_mask as make_causal_mask
from refax.nn.conv import Conv as Conv
from refax.nn.conv import ConvTranspose as ConvTranspose
from refax.nn.linear import Einsum as Einsum
from refax.nn.linear import Embed as Embed
from refax.nn.linear import Linear as Linear
from refax.nn.linear import LinearGeneral as LinearGeneral
from refax.nn.lora import LoRA as LoRA
from refax.nn.lora import LoRALinear as LoRALinear
from refax.nn.lora import LoRAParam as LoRAParam
from refax.nn.normalization import BatchNorm as BatchNorm
from refax.nn.normalization import GroupNorm as GroupNorm
from refax.nn.normalization import InstanceNorm as InstanceNorm
from refax.nn.normalization import LayerNorm as LayerNorm
from refax.nn.normalization import RMSNorm as RMSNorm
from refax.nn.pooling import avg_pool as avg_pool
from refax.nn.pooling import max_pool as max_pool
from refax.nn.pooling import min_pool as min_pool
from refax.nn.pooling import pool as pool
from refax.nn.recurrent import RNN as RNN
from refax.nn.recurrent import Bidirectional as Bidirectional
from refax.nn.recurrent import GRUCell as GRUCell
from refax.nn.recurrent import LSTMCell as LSTMCell
from refax.nn.recurrent import OptimizedLSTMCell as OptimizedLSTMCell
from refax.nn.recurrent import RNNCellBase as RNNCellBase
from refax.nn.recurrent import SimpleCell as SimpleCell
from refax.nn.sequential import Sequential as Sequential
from refax.nn.stochastic import Dropout as Dropout
from refax.nn.weight_norms import SpectralNorm as SpectralNorm
from refax.nn.weight_norms import WeightNorm as WeightNorm
