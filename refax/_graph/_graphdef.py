"""GraphDef: the static, hashable description of an object graph.

A GraphDef is a **flat** tuple of small entries (``ops``), the graph's nodes in the pre-order
of one depth-first walk (see ``_flatten.py``): every entry is followed by the entries of its
children, so the nesting is implied by the entries' arities and no tuple is nested more than
two levels deep. Equality, hashing and pickling therefore cost the same for a chain of ten
thousand Modules as for a wide model, and never hit Python's recursion limit.

Each entry is a tuple whose first element is an opcode:

=========================================  ==================================================
``(OBJ, cls, index, snames, svals,         first visit of an Object: its static attributes
dnames, marks)``                           (sorted names and values), the names of its other
                                           attributes (sorted; one child entry each follows)
                                           and the ``nnx.static``/``nnx.data`` marks (``None``
                                           when there are none)
``(VAR, cls, index, metadata)``            first visit of a Variable; consumes one leaf
``(REF, index)``                           a later visit of the node with that index
``(ARR,)``                                 a raw array attribute; consumes one leaf
``(STATIC, value)``                        a hashable static value
``(LIST, n)`` / ``(TUPLE, n)``             a list / tuple; ``n`` child entries follow
``(DICT, keys)``                           a dict; one child entry per key follows
``(TREE, treedef, keys)``                  any other registered JAX pytree, one level deep
=========================================  ==================================================

Node indices count Objects and Variables in first-visit order, so shared references and cycles
are encoded by ``REF``. Because the encoding is plain tuples of hashable values, equality and
hashing run in C; the hash is cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

OBJ, VAR, REF, ARR, STATIC, LIST, TUPLE, DICT, TREE = range(9)
_OPNAMES = ("OBJ", "VAR", "REF", "ARR", "STATIC", "LIST", "TUPLE", "DICT", "TREE")


def arity(entry: tuple) -> int:
    """How many child entries follow ``entry``."""
    op = entry[0]
    if op == OBJ:
        return len(entry[5])
    if op == LIST or op == TUPLE:
        return entry[1]
    if op == DICT:
        return len(entry[1])
    if op == TREE:
        return len(entry[2])
    return 0


def entry_keys(entry: tuple) -> tuple:
    """The keys of the children of ``entry`` (attribute names, indices or dict keys)."""
    op = entry[0]
    if op == OBJ:
        return entry[5]
    if op == LIST or op == TUPLE:
        return tuple(range(entry[1]))
    if op == DICT:
        return entry[1]
    if op == TREE:
        return entry[2]
    return ()


def skip(ops: tuple, i: int) -> int:
    """The position just after the subtree whose entry is at ``i``."""
    pending = 1
    while pending:
        pending += arity(ops[i]) - 1
        i += 1
    return i


def children(ops: tuple, i: int) -> Iterator[int]:
    """The positions of the child entries of the entry at ``i``."""
    j = i + 1
    for _ in range(arity(ops[i])):
        yield j
        j = skip(ops, j)


class GraphDef:
    """Static structure of an object graph: hashable and compared by value.

    Use it with :func:`refax.merge` to rebuild objects, or as a static argument to ``jax.jit``
    (equal GraphDefs share compilations).

    Attributes:
      ops: the encoded graph, a flat tuple of entries in pre-order (see module docs).
      num_leaves: how many state leaves (Variables and raw arrays) the graph holds.
      num_nodes: how many graph nodes (Objects and Variables) the graph holds.
    """

    __slots__ = ("ops", "num_leaves", "num_nodes", "outer", "tree", "_hash", "_plan")
    __slots__ += ("_nodes", "__weakref__")

    def __init__(
        self,
        ops: tuple,
        num_leaves: int,
        num_nodes: int,
        outer: tuple[int, ...] | None = None,
        tree: bool = False,
    ):
        self.ops = ops
        self.num_leaves = num_leaves
        self.num_nodes = num_nodes
        # node index -> the index the node has outside a transform (-1: none); set by
        # ``flatten(ref_outer_index=...)``, used by ``unflatten(outer_index_outer_ref=...)``
        self.outer = outer
        self.tree = tree  # made in tree mode (graph=False); not part of equality
        self._hash: int | None = None
        self._plan: Any = None  # compiled merge plan (see _plan.py), built on first merge
        self._nodes: tuple | None = None

    def __class_getitem__(cls, item: Any) -> Any:  # ``GraphDef[Module]`` in annotations
        return cls

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash((self.ops, self.num_leaves, self.outer))
        return h

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, GraphDef):
            return NotImplemented
        if self.num_leaves != other.num_leaves or hash(self) != hash(other):
            return False
        return self.ops == other.ops and self.outer == other.outer

    @property
    def nodes(self) -> tuple:
        """The graph's nodes as descriptors, in pre-order: :class:`NodeDef` (an Object or
        container), :class:`VariableDef`, :class:`NodeRef` (a node met before), or, for a
        GraphDef made in tree mode, a single :class:`TreeNodeDef`."""
        if self._nodes is None:
            self._nodes = _describe(self)
        return self._nodes

    @property
    def type(self) -> type | None:
        """The class of the root node (None when the root is a container)."""
        root = self.ops[0]
        return root[1] if root[0] in (OBJ, VAR) else None

    def apply(self, state: Any, *states: Any) -> Any:
        """Returns a proxy: ``graphdef.apply(state)(x)`` or ``.method(x)`` runs functionally.

        Each call returns ``(output, (graphdef, state))`` with the updated state.
        """
        return _CallProxy(self, (state, *states))

    def __repr__(self) -> str:
        body = "\n".join("  " + line for line in render(self.ops))
        return f"GraphDef(num_nodes={self.num_nodes}, num_leaves={self.num_leaves},\n{body}\n)"

    def __reduce__(self):
        return (GraphDef, (self.ops, self.num_leaves, self.num_nodes, self.outer, self.tree))


# -- functional calls: GraphDef.apply and refax.call ------------------------------------------
def _not_installed(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("GraphDef.apply needs refax._graph._api: import refax (or refax._graph)")


class _GraphFunctions:
    """``merge`` and ``split`` for :class:`_CallProxy`, installed by ``refax._graph._api`` when
    it is imported: they build on GraphDef, so this module cannot import them. Importing any
    module of ``refax._graph`` runs the package's ``__init__``, which imports ``_api``, so they
    are in place before a GraphDef exists (the one upward reference in the graph package)."""

    __slots__ = ("merge", "split")

    def __init__(self) -> None:
        self.merge: Callable[..., Any] = _not_installed
        self.split: Callable[..., Any] = _not_installed


API = _GraphFunctions()


class _CallProxy:
    """Functional calls: ``proxy.method(*args)`` returns ``(out, (graphdef, state))``."""

    def __init__(self, graphdef: GraphDef, states: tuple, path: tuple = ()):
        self._graphdef, self._states, self._path = graphdef, states, path

    def __getattr__(self, name: str) -> _CallProxy:
        return _CallProxy(self._graphdef, self._states, (*self._path, name))

    def __getitem__(self, key: Any) -> _CallProxy:
        return _CallProxy(self._graphdef, self._states, (*self._path, _Item(key)))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, tuple[GraphDef, Any]]:
        node = API.merge(self._graphdef, *self._states)
        fn = node
        for name in self._path:
            fn = fn[name.key] if isinstance(name, _Item) else getattr(fn, name)
        out = fn(*args, **kwargs)
        return out, API.split(node)


class _Item:
    """A ``[key]`` step of a :class:`_CallProxy` path."""

    __slots__ = ("key",)

    def __init__(self, key: Any):
        self.key = key


# -- node descriptors (GraphDef.nodes) --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeDef:
    """A graph node in ``GraphDef.nodes``: an Object (``type`` its class, ``index`` its node
    index) or a container (``type`` list, tuple, dict or the pytree's type, ``index`` -1)."""

    type: type
    index: int
    attributes: tuple
    metadata: Any = None


@dataclasses.dataclass(frozen=True)
class VariableDef:
    """A Variable in ``GraphDef.nodes``: its type, node index and metadata."""

    type: type
    index: int
    metadata: Any


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """A node met before (shared), in ``GraphDef.nodes``: the index of its first visit."""

    index: int


@dataclasses.dataclass(frozen=True)
class TreeNodeDef:
    """A GraphDef made in tree mode (``graph=False``), in ``GraphDef.nodes``: the root's type
    and ``path_index``, the ``(path, leaf index)`` of every state leaf, sorted by path."""

    type: Any
    path_index: tuple


def leaf_paths(ops: tuple) -> list[tuple]:
    """The path of every state leaf of an encoding, in walk order (one pass, any depth)."""
    paths: list[tuple] = []
    stack: list[list[Any]] = []  # [keys of the node's children, next child, path]
    for entry in ops:
        if stack:
            top = stack[-1]
            path = (*top[2], top[0][top[1]])
            top[1] += 1
        else:
            path = ()
        op = entry[0]
        if op == VAR or op == ARR:
            paths.append(path)
        elif arity(entry) or op in (OBJ, LIST, TUPLE, DICT, TREE):
            stack.append([entry_keys(entry), 0, path])
        while stack and stack[-1][1] == len(stack[-1][0]):
            stack.pop()
    return paths


def _describe(graphdef: GraphDef) -> tuple:
    ops = graphdef.ops
    if graphdef.tree:
        paths = leaf_paths(ops)
        order = sorted(range(len(paths)), key=lambda i: _path_key(paths[i]))
        root = ops[0]
        root_type = root[1] if root[0] in (OBJ, VAR) else _CONTAINER_TYPES.get(root[0])
        return (TreeNodeDef(root_type, tuple((paths[i], i) for i in order)),)
    out: list[Any] = []
    for entry in ops:
        op = entry[0]
        if op == OBJ:
            out.append(NodeDef(entry[1], entry[2], (*entry[3], *entry[5]), entry[6]))
        elif op == VAR:
            out.append(VariableDef(entry[1], entry[2], entry[3]))
        elif op == REF:
            out.append(NodeRef(entry[1]))
        elif op in _CONTAINER_TYPES:
            container = _CONTAINER_TYPES[op] if op != TREE else entry[1]
            out.append(NodeDef(container, -1, entry_keys(entry)))
    return tuple(out)


_CONTAINER_TYPES = {LIST: list, TUPLE: tuple, DICT: dict, TREE: "pytree"}


def _path_key(path: tuple) -> tuple:
    return tuple((0, k) if isinstance(k, int) else (1, str(k)) for k in path)


def render(ops: tuple) -> list[str]:
    """One line per entry, indented by depth (an iterative walk: any depth renders)."""
    lines: list[str] = []
    # stack of (remaining children, keys iterator, closing text) of the open containers
    stack: list[list[Any]] = []
    for entry in ops:
        label = ""
        if stack:
            top = stack[-1]
            key = next(top[1])
            label = f"{key}=" if top[3] == "attr" else f"{key!r}: "
            top[0] -= 1
        indent = "  " * len(stack)
        op = entry[0]
        if op == OBJ:
            lines.append(f"{indent}{label}{entry[1].__name__}[{entry[2]}](")
            lines.extend(f"{indent}  {n}={v!r}" for n, v in zip(entry[3], entry[4]))
            opening = (")", "attr")
        elif op == VAR:
            lines.append(f"{indent}{label}{entry[1].__name__}[{entry[2]}]")
            opening = None
        elif op == REF:
            lines.append(f"{indent}{label}<ref {entry[1]}>")
            opening = None
        elif op == ARR:
            lines.append(f"{indent}{label}<array>")
            opening = None
        elif op == STATIC:
            lines.append(f"{indent}{label}{entry[1]!r}")
            opening = None
        else:
            brackets = {LIST: "[]", TUPLE: "()", DICT: "{}", TREE: "{}"}[op]
            lines.append(f"{indent}{label}{'pytree' if op == TREE else ''}{brackets[0]}")
            opening = (brackets[1], "key")
        if opening is not None:
            stack.append([arity(entry), iter(entry_keys(entry)), opening[0], opening[1]])
        while stack and stack[-1][0] == 0:
            closing = stack.pop()[2]
            lines.append("  " * len(stack) + closing)
    return lines


# A GraphDef is a pytree with no leaves, so it can be passed straight through jax.jit & co.
jax.tree_util.register_pytree_node(GraphDef, lambda g: ((), g), lambda g, _: g)
