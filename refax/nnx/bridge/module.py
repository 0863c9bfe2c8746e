"""The reference's ``nnx.bridge.module``: ``bridge.Module`` and its context."""

from refax.nnx.bridge._context import MODULE_CONTEXT as MODULE_CONTEXT
from refax.nnx.bridge._context import ModuleFrame as ModuleFrame
from refax.nnx.bridge._context import current_context as current_context
from refax.nnx.bridge._context import current_module as current_module
from refax.nnx.bridge._module import AttrPriority as AttrPriority
from refax.nnx.bridge._module import Module as Module
from refax.nnx.bridge._module import Scope as Scope
from refax.nnx.bridge._module import compact as compact
