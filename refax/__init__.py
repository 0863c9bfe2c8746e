"""refax: neural networks for JAX with Python reference semantics (the NNX API).

``from refax import nnx`` or ``import refax as nnx`` gives the whole public API, flat.
"""

from refax import errors as errors
from refax import nn as nn
from refax import spmd as spmd
from refax import typing as typing
from refax._capture import capture as capture
from refax._config import set_graph_mode as set_graph_mode
from refax._config import set_graph_updates as set_graph_updates
from refax._containers import Dict as Dict
from refax._containers import List as List
from refax._display import display as display
from refax._filters import All as All
from refax._filters import Any as Any
from refax._filters import Everything as Everything
from refax._filters import Not as Not
from refax._filters import Nothing as Nothing
from refax._filters import OfType as OfType
from refax._filters import PathContains as PathContains
from refax._filters import WithTag as WithTag
from refax._graph import GraphDef as GraphDef
from refax._graph import GraphState as GraphState
from refax._graph import MergeContext as MergeContext
from refax._graph import SplitContext as SplitContext
from refax._graph import UpdateContext as UpdateContext
from refax._graph import as_pure as as_pure
from refax._graph import call as call
from refax._graph import clone as clone
from refax._graph import current_update_context as current_update_context
from refax._graph import find_duplicates as find_duplicates
from refax._graph import flatten as flatten
from refax._graph import graphdef as graphdef
from refax._graph import iter_children as iter_children
from refax._graph import iter_graph as iter_graph
from refax._graph import iter_module_children as iter_module_children
from refax._graph import iter_modules as iter_modules
from refax._graph import map as map
from refax._graph import merge as merge
from refax._graph import merge_context as merge_context
from refax._graph import pop as pop
from refax._graph import pure as pure
from refax._graph import recursive_map as recursive_map
from refax._graph import set_metadata as set_metadata
from refax._graph import split as split
from refax._graph import split_context as split_context
from refax._graph import state as state
from refax._graph import unflatten as unflatten
from refax._graph import unpack as unpack
from refax._graph import update as update
from refax._graph import update_context as update_context
from refax._graph import variables as variables
from refax._object import Data as Data
from refax._object import Module as Module
from refax._object import Object as Object
from refax._object import Pytree as Pytree
from refax._object import Static as Static
from refax._object import check_pytree as check_pytree
from refax._object import data as data
from refax._object import dataclass as dataclass
from refax._object import has_data as has_data
from refax._object import is_data as is_data
from refax._object import register_data_type as register_data_type
from refax._object import static as static
from refax._rngs import RngCount as RngCount
from refax._rngs import RngKey as RngKey
from refax._rngs import Rngs as Rngs
from refax._rngs import RngState as RngState
from refax._rngs import RngStream as RngStream
from refax._rngs import backup_keys as backup_keys
from refax._rngs import reseed as reseed
from refax._rngs import restore_rngs as restore_rngs
from refax._statelib import FlatState as FlatState
from refax._statelib import State as State
from refax._statelib import filter_state as filter_state
from refax._statelib import from_flat_state as from_flat_state
from refax._statelib import map_state as map_state
from refax._statelib import merge_state as merge_state
from refax._statelib import replace_by_pure_dict as replace_by_pure_dict
from refax._statelib import restore_int_paths as restore_int_paths
from refax._statelib import split_state as split_state
from refax._statelib import to_flat_state as to_flat_state
from refax._statelib import to_pure_dict as to_pure_dict
from refax._transforms._autodiff import grad as grad
from refax._transforms._autodiff import value_and_grad as value_and_grad
from refax._transforms._control import cond as cond
from refax._transforms._control import fori_loop as fori_loop
from refax._transforms._control import switch as switch
from refax._transforms._control import while_loop as while_loop
from refax._transforms._extract import NodeStates as NodeStates
from refax._transforms._extract import from_tree as from_tree
from refax._transforms._extract import prefix as prefix
from refax._transforms._extract import to_tree as to_tree
from refax._transforms._jit import jit as jit
from refax._transforms._misc import cached_partial as cached_partial
from refax._transforms._misc import checkify as checkify
from refax._transforms._misc import checkpoint as checkpoint
from refax._transforms._misc import eval_shape as eval_shape
from refax._transforms._misc import jit_partial as jit_partial
from refax._transforms._misc import make_jaxpr as make_jaxpr
from refax._transforms._misc import remat as remat
from refax._transforms._pmap import pmap as pmap
from refax._transforms._prefix import PARTITION_NAME as PARTITION_NAME
from refax._transforms._prefix import Carry as Carry
from refax._transforms._prefix import DiffState as DiffState
from refax._transforms._prefix import StateAxes as StateAxes
from refax._transforms._prefix import StateSharding as StateSharding
from refax._transforms._scan import scan as scan
from refax._transforms._shard_map import shard_map as shard_map
from refax._transforms._split_rngs import fork_rngs as fork_rngs
from refax._transforms._split_rngs import split_rngs as split_rngs
from refax._transforms._split_rngs import with_rngs as with_rngs
from refax._transforms._vjp import custom_vjp as custom_vjp
from refax._transforms._vjp import jvp as jvp
from refax._transforms._vjp import vjp as vjp
from refax._transforms._vmap import vmap as vmap
from refax._variables import BatchStat as BatchStat
from refax._variables import Cache as Cache
from refax._variables import Intermediate as Intermediate
from refax._variables import Param as Param
from refax._variables import Perturbation as Perturbation
from refax._variables import Variable as Variable
from refax._variables import VariableMetadata as VariableMetadata
from refax._variables import register_variable_name as register_variable_name
from refax._variables import var_defaults as var_defaults
from refax._variables import variable_name_from_type as variable_name_from_type
from refax._variables import variable_type_from_name as variable_type_from_name
from refax._variables import with_metadata as with_metadata
from refax._view import view as view
from refax._view import view_info as view_info
from refax._view import with_attributes as with_attributes
from refax._with_vars import vars_as as vars_as
from refax._with_vars import with_vars as with_vars
from refax.nn import RNN as RNN
from refax.nn import BatchNorm as BatchNorm
from refax.nn import Bidirectional as Bidirectional
from refax.nn import Conv as Conv
from refax.nn import ConvTranspose as ConvTranspose
from refax.nn import Dropout as Dropout
from refax.nn import Einsum as Einsum
from refax.nn import Embed as Embed
from refax.nn import GroupNorm as GroupNorm
from refax.nn import GRUCell as GRUCell
from refax.nn import InstanceNorm as InstanceNorm
from refax.nn import LayerNorm as LayerNorm
from refax.nn import Linear as Linear
from refax.nn import LinearGeneral as LinearGeneral
from refax.nn import LoRA as LoRA
from refax.nn import LoRALinear as LoRALinear
from refax.nn import LoRAParam as LoRAParam
from refax.nn import LSTMCell as LSTMCell
from refax.nn import MultiHeadAttention as MultiHeadAttention
from refax.nn import OptimizedLSTMCell as OptimizedLSTMCell
from refax.nn import PReLU as PReLU
from refax.nn import RMSNorm as RMSNorm
from refax.nn import RNNCellBase as RNNCellBase
from refax.nn import Sequential as Sequential
from refax.nn import SimpleCell as SimpleCell
from refax.nn import SpectralNorm as SpectralNorm
from refax.nn import WeightNorm as WeightNorm
from refax.nn import avg_pool as avg_pool
from refax.nn import celu as celu
from refax.nn import combine_masks as combine_masks
from refax.nn import dot_product_attention as dot_product_attention
from refax.nn import elu as elu
from refax.nn import gelu as gelu
from refax.nn import glu as glu
from refax.nn import hard_sigmoid as hard_sigmoid
from refax.nn import hard_silu as hard_silu
from refax.nn import hard_swish as hard_swish
from refax.nn import hard_tanh as hard_tanh
from refax.nn import identity as identity
from refax.nn import initializers as initializers
from refax.nn import leaky_relu as leaky_relu
from refax.nn import log_sigmoid as log_sigmoid
from refax.nn import log_softmax as log_softmax
from refax.nn import logsumexp as logsumexp
from refax.nn import make_attention_mask as make_attention_mask
from refax.nn import make_causal_mask as make_causal_mask
from refax.nn import max_pool as max_pool
from refax.nn import min_pool as min_pool
from refax.nn import one_hot as one_hot
from refax.nn import pool as pool
from refax.nn import relu as relu
from refax.nn import relu6 as relu6
from refax.nn import selu as selu
from refax.nn import sigmoid as sigmoid
from refax.nn import silu as silu
from refax.nn import soft_sign as soft_sign
from refax.nn import softmax as softmax
from refax.nn import softplus as softplus
from refax.nn import standardize as standardize
from refax.nn import swish as swish
from refax.nn import tanh as tanh
from refax.spmd import abstract_with_sharding as abstract_with_sharding
from refax.spmd import as_abstract as as_abstract
from refax.spmd import get_abstract_model as get_abstract_model
from refax.spmd import get_named_sharding as get_named_sharding
from refax.spmd import get_partition_spec as get_partition_spec
from refax.spmd import logical_axis_rules as logical_axis_rules
from refax.spmd import use_eager_sharding as use_eager_sharding
from refax.spmd import using_eager_sharding as using_eager_sharding
from refax.spmd import with_partitioning as with_partitioning
from refax.training import EMA as EMA
from refax.training import Metric as Metric
from refax.training import ModelAndOptimizer as ModelAndOptimizer
from refax.training import MultiMetric as MultiMetric
from refax.training import OptArray as OptArray
from refax.training import Optimizer as Optimizer
from refax.training import OptState as OptState
from refax.training import OptVariable as OptVariable
from refax.training import metrics as metrics
from refax.training import optimizer as optimizer
from refax.training._train_state import TrainState as TrainState
from refax.training.summary import tabulate as tabulate
from refax.typing import Initializer as Initializer

PureState = tuple  # tuple[GraphDef, State]

# ``refax.nnx`` re-exports this namespace (so it comes last), plus the reference's module paths
from refax import nnx as nnx  # noqa: E402
from refax.nnx import filterlib as filterlib  # noqa: E402
from refax.nnx import graphlib as graphlib  # noqa: E402
from refax.nnx import rnglib as rnglib  # noqa: E402
from refax.nnx import statelib as statelib  # noqa: E402
from refax.nnx import traversals as traversals  # noqa: E402
from refax.nnx import variablelib as variablelib  # noqa: E402


def __getattr__(name: str):  # ``refax.bridge`` needs Flax's Linen: imported on first use only
    if name == "bridge":
        import importlib

        return importlib.import_module("refax.nnx.bridge")
    raise AttributeError(f"module 'refax' has no attribute {name!r}")
