"""The bridge's per-thread context: which bridge Module is running, and whether this is an init.

Two stacks, both thread-local:

* ``MODULE_CONTEXT.module_stack``: one :class:`ModuleFrame` per running method of a
  :class:`~refax.nnx.bridge.Module` (the module, whether the method is ``compact``, and the
  counters that name the submodules a compact method creates);
* the core init flag (``refax._object.INIT_FLAG``, read as ``obj._pytree__state.initializing``):
  ``True`` while ``bridge.lazy_init`` or ``Module.init`` runs, ``False`` inside
  ``Module.apply``. Wrapped Linen modules (``ToNNX``) initialise their
  variables instead of applying them while it is ``True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from refax._object import INIT_FLAG

__all__ = ["MODULE_CONTEXT", "ModuleFrame", "current_context", "current_module", "initializing"]


@dataclasses.dataclass(eq=False)
class ModuleFrame:
    """One running method of a bridge Module.

    Attributes:
      module: the bridge Module whose method runs.
      in_compact: whether the method is decorated with ``bridge.compact``.
      counters: per-class counters naming the submodules created in this call
        (``Dense_0``, ``Dense_1``, ...).
    """

    module: Any
    in_compact: bool
    counters: dict[str, int] = dataclasses.field(default_factory=dict)

    def next_name(self, prefix: str) -> str:
        """The next automatic name for a submodule of class ``prefix``."""
        n = self.counters.get(prefix, 0)
        self.counters[prefix] = n + 1
        return f"{prefix}_{n}"


class _ModuleContext(threading.local):
    def __init__(self) -> None:
        self.module_stack: list[ModuleFrame] = []


MODULE_CONTEXT = _ModuleContext()


def current_context() -> ModuleFrame | None:
    """The frame of the bridge Module method running now, or ``None``.

    Example:
      >>> from refax.nnx import bridge
      >>> bridge.current_context() is None
      True
    """
    stack = MODULE_CONTEXT.module_stack
    return stack[-1] if stack else None


def current_module() -> Any:
    """The bridge Module whose method is running now, or ``None`` outside any.

    Example:
      >>> from refax.nnx import bridge
      >>> class Foo(bridge.Module):
      ...   def __call__(self):
      ...     return bridge.current_module() is self
      >>> Foo().apply({})
      True
    """
    frame = current_context()
    return None if frame is None else frame.module


def is_initializing() -> bool:
    """True inside ``bridge.lazy_init`` or a bridge Module's ``init``."""
    return INIT_FLAG.stack[-1]


@contextlib.contextmanager
def initializing(flag: bool) -> Iterator[None]:
    """Runs the block with the init flag set to ``flag``."""
    INIT_FLAG.stack.append(flag)
    try:
        yield
    finally:
        INIT_FLAG.stack.pop()


@contextlib.contextmanager
def module_frame(module: Any, in_compact: bool) -> Iterator[ModuleFrame]:
    """Runs the block as a method of ``module``."""
    frame = ModuleFrame(module, in_compact)
    MODULE_CONTEXT.module_stack.append(frame)
    try:
        yield frame
    finally:
        MODULE_CONTEXT.module_stack.pop()
