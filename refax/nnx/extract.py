"""The reference's ``nnx.extract``: objects <-> pure trees for hand-written transforms."""

from refax._transforms._extract import NodeStates as NodeStates
from refax._transforms._extract import TreeState as TreeState
from refax._transforms._extract import broadcast_prefix as broadcast_prefix
from refax._transforms._extract import clear_non_graph_nodes as clear_non_graph_nodes
from refax._transforms._extract import from_tree as from_tree
from refax._transforms._extract import prefix as prefix
from refax._transforms._extract import to_tree as to_tree

__all__ = [
    "NodeStates",
    "TreeState",
    "broadcast_prefix",
    "clear_non_graph_nodes",
    "from_tree",
    "prefix",
    "to_tree",
]
