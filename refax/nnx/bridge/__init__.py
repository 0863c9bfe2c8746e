"""Linen interop: Linen modules inside refax models and refax Modules inside Linen models.

Needs Flax's Linen (``pip install refax[linen]``); nothing else in refax imports it.

* :class:`ToNNX` / :func:`lazy_init`: a Linen module used as a refax Module.
* :class:`ToLinen` / :func:`to_linen`: a refax Module used inside a Linen model.
* :class:`NNXMeta`, :func:`to_linen_var`, :func:`to_nnx_var`, :func:`with_partitioning`:
  Variables and their metadata across the boundary (collections <-> Variable types, Linen
  partitioning boxes <-> ``out_sharding``).
* :class:`Module`, :func:`compact`, :class:`Scope`, :func:`nnx_in_bridge_mdl`,
  :func:`linen_in_bridge_mdl`: Linen-style modules that are refax Modules, for porting a Linen
  code base one module at a time.
* :func:`functional`: pure ``init`` / ``apply`` for a refax Module class.

See ``docs/linen.md`` for a migration guide.
"""

try:
    import flax.linen as _linen  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "refax.nnx.bridge needs Flax's Linen, which is not installed: pip install refax[linen]"
    ) from _err

import refax.errors as _refax_errors
from refax.nnx.bridge import interop as interop
from refax.nnx.bridge import module as module
from refax.nnx.bridge import variables as variables
from refax.nnx.bridge import wrappers as wrappers
from refax.nnx.bridge._context import MODULE_CONTEXT as MODULE_CONTEXT
from refax.nnx.bridge._context import current_context as current_context
from refax.nnx.bridge._context import current_module as current_module
from refax.nnx.bridge._functional import Functional as Functional
from refax.nnx.bridge._functional import functional as functional
from refax.nnx.bridge._interop import linen_in_bridge_mdl as linen_in_bridge_mdl
from refax.nnx.bridge._interop import nnx_in_bridge_mdl as nnx_in_bridge_mdl
from refax.nnx.bridge._module import AttrPriority as AttrPriority
from refax.nnx.bridge._module import Module as Module
from refax.nnx.bridge._module import Scope as Scope
from refax.nnx.bridge._module import compact as compact
from refax.nnx.bridge._module import linen_errors as _linen_errors
from refax.nnx.bridge._variables import NNXMeta as NNXMeta
from refax.nnx.bridge._variables import to_linen_var as to_linen_var
from refax.nnx.bridge._variables import to_nnx_var as to_nnx_var
from refax.nnx.bridge._variables import with_partitioning as with_partitioning
from refax.nnx.bridge._wrappers import ToLinen as ToLinen
from refax.nnx.bridge._wrappers import ToNNX as ToNNX
from refax.nnx.bridge._wrappers import lazy_init as lazy_init
from refax.nnx.bridge._wrappers import linen_rngs_dict as linen_rngs_dict
from refax.nnx.bridge._wrappers import to_linen as to_linen


def _expose_linen_errors() -> None:
    """Makes Linen's error classes (``ScopeParamNotFoundError``, ...) reachable as
    ``refax.errors.X`` too, so code written against ``flax.errors`` keeps its ``except``
    clauses after the import change. refax's own error classes are never replaced."""
    for name in dir(_linen_errors):
        cls = getattr(_linen_errors, name)
        if isinstance(cls, type) and issubclass(cls, Exception) and name not in vars(_refax_errors):
            setattr(_refax_errors, name, cls)


_expose_linen_errors()
