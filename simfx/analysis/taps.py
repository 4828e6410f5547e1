"""Analysis — taps: where the model's own forward lets SIM read a boundary's ``x`` and ``y``.

A model captured for analysis only (``TracedModel.runtime == "model"``) trains by
running its own forward; SIM reads each chosen block's input and output as
they cross a module call, with a forward pre-hook (a call's arguments, before
the module runs) or a forward hook (its result). A :class:`TapPoint` says which
call, which side and where in the arguments or result; a boundary can take SIM
under this runtime only when both its ``x`` and its ``y`` have one.

The rule, per value: the block's own call first (its argument ``x``, its result
``y``); else a call inside the region that takes ``x`` (the first) or returns
``y`` (the outermost); else the call that produced ``x`` (outermost) or the first
call after the region that takes ``y``. ``x`` must be read no later than ``y``.

>>> TapPoint("layers.0", 0, "input", (("arg", 0, "hidden_states"),), "x").describe()
"argument hidden_states of 'layers.0'"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch.fx as fx
from torch import nn

from ..capture.record import ModuleCall, ScopeFrame, TracedModel, value_paths

__all__ = ["TapPoint", "BlockTaps", "tap_points", "untappable_reason"]


@dataclass(frozen=True)
class TapPoint:
    """One value SIM reads at a module call.

    ``module`` is the qualified name, ``call`` which call of it in a step (0 for the
    first), ``side`` ``"input"`` (read from the call's arguments, before the module
    runs) or ``"output"`` (from its result). ``path`` leads to the value: for an
    input, first ``("arg", position, parameter name)`` or ``("kwarg", name)``, then
    ``("item", key)``/``("attr", name)`` steps into containers; for an output, only
    the latter. ``node`` is the analysis graph's node of the value.
    """

    module: str
    call: int
    side: str
    path: tuple
    node: str

    def describe(self) -> str:
        head = self.path[0] if self.path else None
        if self.side == "input" and head is not None:
            where = f"argument {head[-1] if head[0] == 'arg' and head[-1] else head[1]}"
            rest = self.path[1:]
        else:
            where, rest = "the result", self.path
        inner = "".join(f"[{key!r}]" if kind == "item" else f".{key}" for kind, key in rest)
        call = f"@{self.call}" if self.call else ""
        return f"{where}{inner} of '{self.module}{call}'"


@dataclass(frozen=True)
class BlockTaps:
    """Where one block's ``x`` and ``y`` are read."""

    x: TapPoint
    y: TapPoint


def tap_points(traced: TracedModel, boundary: Any) -> BlockTaps | str:
    """The :class:`BlockTaps` of an eligible boundary, or why the model runtime cannot read it."""
    index = _CallIndex.of(traced)
    x = index.reader_of_input(boundary)
    y = index.reader_of_output(boundary)
    if x is None:
        return (f"its input '{boundary.entry}' is computed inside a forward's code and reaches no module call as an "
                f"argument or result, where SIM reads it when the model runs itself")
    if y is None:
        return (f"its output '{boundary.exit}' is computed inside a forward's code and reaches no module call as an "
                f"argument or result, where SIM reads it when the model runs itself")
    if index.moment(x) > index.moment(y):
        return f"its input is read at {x.describe()}, after its output at {y.describe()}"
    return BlockTaps(x, y)


def untappable_reason(traced: TracedModel, boundary: Any) -> str:
    """"" when the model runtime can read ``boundary``, else why not."""
    found = tap_points(traced, boundary)
    return found if isinstance(found, str) else ""


class _CallIndex:
    """The module calls of a capture, indexed by the graph values they take and return."""

    def __init__(self, traced: TracedModel):
        self.order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
        members: dict[ScopeFrame, list[str]] = {}
        for node in traced.graph.nodes:
            for frame in traced.scope(node):
                members.setdefault(frame, []).append(node.name)
        self.members = {frame: tuple(names) for frame, names in members.items()}
        self.calls = sorted(traced.calls.values(), key=lambda c: self._span(c.frame))
        modules = dict(traced.model.named_modules())
        self.inputs = {c.frame: dict(_input_paths(c, modules.get(c.frame.name))) for c in self.calls}

    @classmethod
    def of(cls, traced: TracedModel) -> "_CallIndex":
        """The index of ``traced``, built once per capture."""
        cached = traced.__dict__.get("_call_index")
        if cached is None:
            cached = traced.__dict__["_call_index"] = cls(traced)
        return cached

    def _span(self, frame: ScopeFrame) -> tuple[int, int]:
        """The graph positions of the first and last node recorded inside a call."""
        names = self.members.get(frame, ())
        return (self.order[names[0]], self.order[names[-1]]) if names else (0, 0)

    def moment(self, tap: TapPoint) -> tuple[int, int]:
        """When a tap reads, in graph order: an input at its call's start, an output at its end."""
        start, end = self._tap_span(tap)
        return (start, 0) if tap.side == "input" else (end, 1)

    def _tap_span(self, tap: TapPoint) -> tuple[int, int]:
        frame = next(c.frame for c in self.calls if c.frame.name == tap.module and c.frame.call == tap.call)
        return self._span(frame)

    def _within(self, call: ModuleCall, nodes: frozenset[str]) -> bool:
        """Every graph node recorded inside ``call`` belongs to the region."""
        names = self.members.get(call.frame, ())
        return bool(names) and all(n in nodes for n in names)

    def _input_tap(self, call: ModuleCall, node: str) -> TapPoint | None:
        path = self.inputs[call.frame].get(node)
        return None if path is None else TapPoint(call.frame.name, call.frame.call, "input", path, node)

    @staticmethod
    def _output_tap(call: ModuleCall, node: str) -> TapPoint | None:
        path = call.outputs.get(node)
        return None if path is None else TapPoint(call.frame.name, call.frame.call, "output", tuple(path), node)

    def _own_call(self, boundary: Any) -> ModuleCall | None:
        if boundary.kind != "module":
            return None
        return next((c for c in self.calls if c.frame.key == boundary.name), None)

    def reader_of_input(self, boundary: Any) -> TapPoint | None:
        node = boundary.entry
        own = self._own_call(boundary)
        if own is not None and (tap := self._input_tap(own, node)) is not None:
            return tap
        nodes = frozenset(boundary.nodes)
        for call in self.calls:
            if self._within(call, nodes) and (tap := self._input_tap(call, node)) is not None:
                return tap
        producers = [tap for c in self.calls if (tap := self._output_tap(c, node)) is not None]
        return min(producers, key=lambda t: t.module.count("."), default=None)

    def reader_of_output(self, boundary: Any) -> TapPoint | None:
        node = boundary.exit
        own = self._own_call(boundary)
        if own is not None and (tap := self._output_tap(own, node)) is not None:
            return tap
        nodes = frozenset(boundary.nodes)
        inside = [tap for c in self.calls if self._within(c, nodes) and (tap := self._output_tap(c, node))]
        if inside:
            return min(inside, key=lambda t: t.module.count("."))
        end = self.order.get(node, 0)
        later = [c for c in self.calls if self._span(c.frame)[0] > end]
        return next((tap for c in later if (tap := self._input_tap(c, node)) is not None), None)


def _input_paths(call: ModuleCall, module: nn.Module | None) -> Iterator[tuple[str, tuple]]:
    """(node name, path) of every graph value among a call's arguments, the first path of each."""
    names = _positional_names(module)
    seen: set[str] = set()
    for position, value in enumerate(call.args):
        name = names[position] if position < len(names) else ""
        for node, rest in value_paths(value, _node_name):
            if node not in seen:
                seen.add(node)
                yield node, (("arg", position, name), *rest)
    for key, value in call.kwargs.items():
        for node, rest in value_paths(value, _node_name):
            if node not in seen:
                seen.add(node)
                yield node, (("kwarg", key), *rest)


def _node_name(value: Any) -> str | None:
    return value.name if isinstance(value, fx.Node) else None


def _positional_names(module: nn.Module | None) -> list[str]:
    """The names of a module's forward parameters that can be passed by position."""
    if module is None:
        return []
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]
