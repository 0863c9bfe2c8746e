"""The object graph <-> pytree boundary (see README.md in this folder).

The public graph API (``__all__``) is re-exported by ``refax`` and ``refax.nnx.graphlib``.
"""

from refax._graph._api import GraphState as GraphState
from refax._graph._api import as_pure as as_pure
from refax._graph._api import call as call
from refax._graph._api import clone as clone
from refax._graph._api import find_duplicates as find_duplicates
from refax._graph._api import graphdef as graphdef
from refax._graph._api import iter_children as iter_children
from refax._graph._api import iter_graph as iter_graph
from refax._graph._api import map as map
from refax._graph._api import merge as merge
from refax._graph._api import pop as pop
from refax._graph._api import pure as pure
from refax._graph._api import recursive_map as recursive_map
from refax._graph._api import set_metadata as set_metadata
from refax._graph._api import split as split
from refax._graph._api import state as state
from refax._graph._api import unpack as unpack
from refax._graph._api import update as update
from refax._graph._api import variables as variables
from refax._graph._context import MergeContext as MergeContext
from refax._graph._context import SplitContext as SplitContext
from refax._graph._context import UpdateContext as UpdateContext
from refax._graph._context import current_update_context as current_update_context
from refax._graph._context import flatten as flatten
from refax._graph._context import merge_context as merge_context
from refax._graph._context import split_context as split_context
from refax._graph._context import unflatten as unflatten
from refax._graph._context import update_context as update_context
from refax._graph._flatten import is_graph_node as is_graph_node
from refax._graph._graphdef import GraphDef as GraphDef
from refax._graph._graphdef import NodeDef as NodeDef
from refax._graph._graphdef import NodeRef as NodeRef
from refax._graph._graphdef import TreeNodeDef as TreeNodeDef
from refax._graph._graphdef import VariableDef as VariableDef
from refax._graph._refmap import IndexMap as IndexMap
from refax._graph._refmap import RefMap as RefMap
from refax._statelib import FlatState as FlatState
from refax._statelib import State as State

__all__ = [
    "FlatState",
    "IndexMap",
    "MergeContext",
    "NodeDef",
    "NodeRef",
    "RefMap",
    "SplitContext",
    "State",
    "TreeNodeDef",
    "UpdateContext",
    "VariableDef",
    "current_update_context",
    "flatten",
    "merge_context",
    "split_context",
    "unflatten",
    "update_context",
    "GraphDef",
    "GraphState",
    "as_pure",
    "call",
    "clone",
    "find_duplicates",
    "graphdef",
    "is_graph_node",
    "iter_children",
    "iter_graph",
    "map",
    "merge",
    "pop",
    "pure",
    "recursive_map",
    "set_metadata",
    "split",
    "state",
    "unpack",
    "update",
    "variables",
]
