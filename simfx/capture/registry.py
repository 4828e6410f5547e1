"""Registries of what tracing keeps whole: leaf modules and autowrapped functions.

Small objects in the manner of timm's ``layers/_fx.py``: a process-wide default
set, registration that can be undone (``unregister``) or scoped to a block of
code (``registered``), and *sources*: libraries that keep their own marks
(timm's ``register_notrace_module``) are read at trace time, never copied in::

    simfx.register_leaf_module(MyUntraceableBlock)         # for every transform
    with simfx.LEAF_MODULES.registered(MyUntraceableBlock):
        sim = simfx.transform(model, x)                     # for this one only
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from torch import nn

__all__ = [
    "Registry", "LEAF_MODULES", "AUTOWRAP_FUNCTIONS", "register_leaf_module", "register_autowrap_function",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """A set of registrations, plus sources read on every use.

    ``check(item)`` returns an error message for an item that cannot be
    registered ("" when it can).
    """

    def __init__(self, what: str, check: Callable[[Any], str]):
        self.what = what
        self._check = check
        self._items: list[T] = []
        self._sources: list[Callable[[], Iterable[T]]] = []

    def register(self, item: T) -> T:
        """Add ``item`` (returned, so this works as a decorator)."""
        problem = self._check(item)
        if problem:
            raise TypeError(problem)
        if item not in self._items:
            self._items.append(item)
        return item

    def unregister(self, item: T) -> None:
        """Remove ``item``; a ValueError if it was not registered here."""
        if item not in self._items:
            raise ValueError(f"{item!r} is not a registered {self.what}.")
        self._items.remove(item)

    @contextlib.contextmanager
    def registered(self, *items: T) -> Iterator[None]:
        """Register ``items`` for the block of code inside, then undo what this added."""
        added = [item for item in items if item not in self._items]
        for item in items:
            self.register(item)
        try:
            yield
        finally:
            for item in added:
                self._items.remove(item)

    def add_source(self, source: Callable[[], Iterable[T]]) -> None:
        """Read ``source()`` on every use: registrations a library keeps itself."""
        self._sources.append(source)

    def items(self) -> tuple[T, ...]:
        """Everything registered, then what the sources hold now."""
        found = list(self._items)
        for source in self._sources:
            found.extend(item for item in source() if item not in found)
        return tuple(found)

    def __contains__(self, item: object) -> bool:
        return item in self.items()


def _module_class_problem(item: Any) -> str:
    if isinstance(item, type) and issubclass(item, nn.Module):
        return ""
    return f"register_leaf_module expects an nn.Module subclass, got {item!r}."


def _function_problem(item: Any) -> str:
    return "" if callable(item) else f"register_autowrap_function expects a function, got {item!r}."


LEAF_MODULES: Registry[type] = Registry("leaf module", _module_class_problem)
AUTOWRAP_FUNCTIONS: Registry[Callable[..., Any]] = Registry("autowrap function", _function_problem)


def register_leaf_module(module_class: type) -> type:
    """Keep every instance of ``module_class`` opaque when tracing (usable as a decorator).

    Undo with ``simfx.LEAF_MODULES.unregister(module_class)``, or register for one
    block of code with ``with simfx.LEAF_MODULES.registered(module_class): ...``.

    >>> import torch, simfx
    >>> @simfx.register_leaf_module
    ... class Untraceable(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x
    >>> simfx.LEAF_MODULES.unregister(Untraceable)
    """
    return LEAF_MODULES.register(module_class)


def register_autowrap_function(function: Callable[..., Any]) -> Callable[..., Any]:
    """Record calls to ``function`` as single graph nodes instead of tracing into them.

    The function must be a public module-level function called by name from a
    forward (fx's autowrap skips names starting with an underscore). Usable as a
    decorator; undo with ``simfx.AUTOWRAP_FUNCTIONS.unregister(function)``.
    """
    return AUTOWRAP_FUNCTIONS.register(function)
