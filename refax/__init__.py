"""refax: neural networks for JAX with Python reference semantics (the NNX API).

``from refax import nnx`` or ``import refax as nnx`` gives the whole public API, flat.
"""

from refax import errors as errors
from refax import typing as typing
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
from refax._graph import as_pure as as_pure
from refax._graph import call as call
from refax._graph import clone as clone
from refax._graph import find_duplicates as find_duplicates
from refax._graph import graphdef as graphdef
from refax._graph import iter_children as iter_children
from refax._graph import iter_graph as iter_graph
from refax._graph import iter_module_children as iter_module_children
from refax._graph import iter_modules as iter_modules
from refax._graph import map as map
from refax._graph import merge as merge
from refax._graph import pop as pop
from refax._graph import pure as pure
from refax._graph import recursive_map as recursive_map
from refax._graph import set_metadata as set_metadata
from refax._graph import split as split
from refax._graph import state as state
from refax._graph import unpack as unpack
from refax._graph import update as update
from refax._graph import variables as variables
from refax._object import Data as Data
from refax._object import Module as Module
from refax._object import Object as Object
from refax._object import Pytree as Pytree
from refax._object import Static as Static
from refax._object import check_pytree as check_pytree
from refax._object import data as data
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
from refax._variables import BatchStat as BatchStat
from refax._variables import Cache as Cache
from refax._variables import Intermediate as Intermediate
from refax._variables import Param as Param
from refax._variables import Perturbation as Perturbation
from refax._variables import Variable as Variable
from refax._variables import VariableMetadata as VariableMetadata
from refax._variables import register_variable_name as register_variable_name
from refax._variables import variable_name_from_type as variable_name_from_type
from refax._variables import variable_type_from_name as variable_type_from_name
from refax._variables import with_metadata as with_metadata

PureState = tuple  # tuple[GraphDef, State]

from refax import nnx as nnx  # noqa: E402  (the module re-exports this namespace)
