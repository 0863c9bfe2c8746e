"""GraphDef: the static, hashable description of an object graph.

A GraphDef is an immutable nested-tuple *encoding* of the graph produced by one depth-first walk
(see ``_flatten.py``). Each entry is a small tuple whose first element is an opcode:

=========================================  ==================================================
``(OBJ, cls, index, names, values, dyn,    first visit of an Object: static attribute names
marks)``                                   and values, ``((name, enc), ...)`` for the rest
                                           (names sorted), and the ``nnx.static``/``nnx.data``
                                           marks (``None`` when there are none)
``(VAR, cls, index, metadata)``            first visit of a Variable; consumes one leaf
``(REF, index)``                           a later visit of the node with that index
``(ARR,)``                                 a raw array attribute; consumes one leaf
``(STATIC, value)``                        a hashable static value
``(LIST, (enc, ...))``                     a list; same for ``TUPLE``
``(DICT, (key, ...), (enc, ...))``         a dict (keys sorted when sortable)
``(TREE, treedef, (key, ...), (enc, ...))`` any other registered JAX pytree, one level deep
=========================================  ==================================================

Node indices count Objects and Variables in first-visit order, so shared references and cycles
are encoded by ``REF``. Because the encoding is plain tuples of hashable values, equality and
hashing run in C; the hash is cached.
"""

from __future__ import annotations

from typing import Any

import jax

OBJ, VAR, REF, ARR, STATIC, LIST, TUPLE, DICT, TREE = range(9)
_OPNAMES = ("OBJ", "VAR", "REF", "ARR", "STATIC", "LIST", "TUPLE", "DICT", "TREE")


class GraphDef:
    """Static structure of an object graph: hashable and compared by value.

    Use it with :func:`refax.merge` to rebuild objects, or as a static argument to ``jax.jit``
    (equal GraphDefs share compilations).

    Attributes:
      root: the encoded root node (see module docs).
      num_leaves: how many state leaves (Variables and raw arrays) the graph holds.
      num_nodes: how many graph nodes (Objects and Variables) the graph holds.
    """

    __slots__ = ("root", "num_leaves", "num_nodes", "_hash", "_plan")

    def __init__(self, root: tuple, num_leaves: int, num_nodes: int):
        self.root = root
        self.num_leaves = num_leaves
        self.num_nodes = num_nodes
        self._hash: int | None = None
        self._plan: Any = None  # compiled merge plan (see _plan.py), built on first merge

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash((self.root, self.num_leaves))
        return h

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, GraphDef):
            return NotImplemented
        if self.num_leaves != other.num_leaves or hash(self) != hash(other):
            return False
        return self.root == other.root

    @property
    def type(self) -> type | None:
        """The class of the root node (None when the root is a container)."""
        return self.root[1] if self.root[0] in (OBJ, VAR) else None

    def apply(self, state: Any, *states: Any) -> Any:
        """Returns a proxy: ``graphdef.apply(state)(x)`` or ``.method(x)`` runs functionally.

        Each call returns ``(output, (graphdef, state))`` with the updated state.
        """
        from refax._graph._api import _CallProxy

        return _CallProxy(self, (state, *states))

    def __repr__(self) -> str:
        lines: list[str] = []
        _render(self.root, "", lines, "")
        body = "\n".join("  " + ln for ln in lines)
        return f"GraphDef(num_nodes={self.num_nodes}, num_leaves={self.num_leaves},\n{body}\n)"

    def __reduce__(self):
        return (GraphDef, (self.root, self.num_leaves, self.num_nodes))


def _render(enc: tuple, label: str, out: list[str], indent: str) -> None:
    op = enc[0]
    prefix = f"{indent}{label}"
    if op == OBJ:
        out.append(f"{prefix}{enc[1].__name__}[{enc[2]}](")
        for name, value in zip(enc[3], enc[4]):
            out.append(f"{indent}  {name}={value!r}")
        for name, child in enc[5]:
            _render(child, f"{name}=", out, indent + "  ")
        out.append(f"{indent})")
    elif op == VAR:
        out.append(f"{prefix}{enc[1].__name__}[{enc[2]}]")
    elif op == REF:
        out.append(f"{prefix}<ref {enc[1]}>")
    elif op == ARR:
        out.append(f"{prefix}<array>")
    elif op == STATIC:
        out.append(f"{prefix}{enc[1]!r}")
    elif op in (LIST, TUPLE):
        out.append(f"{prefix}{'[' if op == LIST else '('}")
        for i, child in enumerate(enc[1]):
            _render(child, f"{i}: ", out, indent + "  ")
        out.append(f"{indent}{']' if op == LIST else ')'}")
    else:
        keys, children = (enc[1], enc[2]) if op == DICT else (enc[2], enc[3])
        out.append(f"{prefix}{'{' if op == DICT else 'pytree{'}")
        for k, child in zip(keys, children):
            _render(child, f"{k!r}: ", out, indent + "  ")
        out.append(f"{indent}}}")


# A GraphDef is a pytree with no leaves, so it can be passed straight through jax.jit & co.
jax.tree_util.register_pytree_node(GraphDef, lambda g: ((), g), lambda g, _: g)
