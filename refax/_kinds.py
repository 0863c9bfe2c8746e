"""Value kinds for the graph walk, classified once per type.

Every attribute value of an Object falls in one kind: static (hashable, goes into the
GraphDef), array (a state leaf), Variable or Object (graph nodes), list/tuple/dict containers,
another registered JAX pytree, or an "other" value that must be hash-checked. The kind depends
only on the value's type (``KIND`` caches it per type), except for tuples, which are static
when everything in them is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from refax._variables import Variable

K_STATIC, K_ARRAY, K_VAR, K_OBJ, K_LIST, K_TUPLE, K_DICT, K_TREE, K_OTHER, K_SKIP = range(10)

KIND: dict[type, int] = {
    int: K_STATIC,
    float: K_STATIC,
    bool: K_STATIC,
    str: K_STATIC,
    bytes: K_STATIC,
    complex: K_STATIC,
    type(None): K_STATIC,
    type: K_STATIC,
    list: K_LIST,
    tuple: K_TUPLE,
    dict: K_DICT,
    np.ndarray: K_ARRAY,
    jax.ShapeDtypeStruct: K_ARRAY,
    jax.Ref: K_ARRAY,  # JAX's mutable array reference: state, like an array
}


_LEAF_TYPES: tuple[type, ...] = ()


def register_leaf_type(typ: type) -> None:
    """Instances of ``typ`` (and subclasses) become state leaves, like arrays."""
    global _LEAF_TYPES
    if typ not in _LEAF_TYPES:
        _LEAF_TYPES = (*_LEAF_TYPES, typ)
    for t in [t for t in KIND if issubclass(t, typ)]:
        del KIND[t]


def kind_of(value: Any) -> int:
    """Classifies ``value`` (cached per type)."""
    t = type(value)
    k = KIND.get(t)
    if k is None:
        if issubclass(t, Variable):
            k = K_VAR
        elif getattr(t, "_refax_object", False):
            k = K_OBJ
        elif isinstance(value, (jax.Array, np.ndarray)) or issubclass(t, _LEAF_TYPES):
            k = K_ARRAY
        elif issubclass(t, (np.generic, type)):
            k = K_STATIC  # numpy scalars, and classes (e.g. jnp.float32) whatever their metaclass
        else:
            treedef = jax.tree_util.tree_structure(value)
            if not (treedef.num_nodes == 1 and treedef.num_leaves == 1):
                k = K_TREE  # a registered pytree: walked one level at a time
            elif t.__hash__ is object.__hash__:
                k = K_STATIC  # identity-hashed (functions, plain objects): always hashable
            else:
                k = K_OTHER  # hashable only if its __hash__ says so: checked per value
        KIND[t] = k
    return k


def all_static(t: tuple) -> bool:
    """True if the tuple holds only static values (then it is static itself)."""
    for v in t:
        kv = KIND.get(type(v))
        if kv is None:
            kv = kind_of(v)
        if kv != K_STATIC and not (kv == K_TUPLE and all_static(v)):
            return False
    return True


def is_static_value(value: Any) -> bool:
    """True if ``value`` goes into the GraphDef as is (static and hashable)."""
    k = KIND.get(type(value))
    if k is None:
        k = kind_of(value)
    if k == K_STATIC:
        return True
    if k == K_TUPLE:
        return all_static(value)
    if k == K_OTHER:
        try:
            hash(value)
        except TypeError:
            return False
        return True
    return False
