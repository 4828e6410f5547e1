"""What capture hands to the later stages: one typed record, :class:`TracedModel`.

Both frontends (fx, export) produce it. Everything the later stages need to know
about the graph's nodes travels in it by node name — the module calls each was
recorded inside (``scopes``), which ran without gradients (``no_grad``), which
only rebuild the output container (``output_containers``) — so no stage reads
another's marks on the nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch.fx as fx
from torch import nn

from .inputs import CallTemplate
from .recorders import Finding

__all__ = ["ScopeFrame", "ModuleCall", "TracedModel", "LeafStructure", "frames_from_module_stack", "value_paths"]


class ScopeFrame(NamedTuple):
    """One module call a node was recorded inside: qualified name, class, call number."""

    name: str
    type: type
    call: int

    @property
    def key(self) -> str:
        """``name`` for the first call of a module, ``name@k`` for its k-th repeat."""
        return self.name if self.call == 0 else f"{self.name}@{self.call}"


@dataclass(frozen=True)
class ModuleCall:
    """One traced-through module call, as graph arguments: enough to call the module again as one node.

    ``args``/``kwargs`` are fx arguments (nodes and constants). ``outputs`` maps the
    name of each node the call returned to its access path in the result: a tuple
    of ``("item", key)``/``("attr", name)`` steps (empty: the result itself).
    ``grad_enabled`` is the grad mode the call ran under.
    """

    frame: ScopeFrame
    args: tuple
    kwargs: Mapping[str, Any]
    outputs: Mapping[str, tuple]
    grad_enabled: bool


def value_paths(value: Any, name_of: Callable[[Any], str | None], path: tuple = ()) -> Iterator[tuple[str, tuple]]:
    """(name, access path) of every graph value in a nested call argument or result.

    ``name_of`` names a graph value (a node, a proxy) and returns None for anything
    else; tuples, lists and mappings are walked, with ``("item", key)`` steps.
    """
    name = name_of(value)
    if name is not None:
        yield name, path
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from value_paths(item, name_of, (*path, ("item", i)))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from value_paths(item, name_of, (*path, ("item", key)))


# How an opaque module's output is traced: None for one proxy, else the structure
# of its tuple/list result (element i: None for a proxy[i], or ("constant", value)).
LeafStructure = Any


@dataclass
class TracedModel:
    """What capture produced: the training graph over one root module, and what the trace saw.

    ``root`` holds every attribute the graph references (the user's submodules,
    plus any tensor constants the tracer had to store); ``model`` is the user's
    own module (what eval mode runs). ``inputs`` are the example values in the
    graph's placeholder order and ``call`` turns them back into the model's call.

    About the graph's nodes, by name: ``scopes`` (the module calls each was
    recorded inside, outermost first), ``no_grad`` (recorded with gradients off)
    and ``output_containers`` (nodes that only rebuild the output's dict or
    ``ModelOutput``).

    ``batch`` is the example's batch size where the graph's first input does not
    show it (None: that input's first axis).

    ``runtime`` says what trains: ``"graph"`` (this graph, with the chosen blocks
    put back as calls of their modules: fx) or ``"model"`` (the model's own
    forward, with SIM reading the chosen blocks at their module calls; the graph
    is only analysed: export).

    ``opaque`` maps the qualified names of modules kept opaque to the reason;
    ``automatic`` names those kept opaque without being asked to (fx failed inside
    them, or they are torch.nn containers of several weight layers). ``calls`` are
    the traced-through module calls; ``flag_readers`` maps each module whose
    ``training`` flag traced code read to (where, the module whose code read it,
    the value it read); ``findings`` what the trace could not keep (see
    :mod:`simfx.capture.recorders`). ``frontend`` is ``"fx"`` or ``"export"``.
    """

    root: nn.Module
    model: nn.Module
    graph: fx.Graph
    call: CallTemplate
    scopes: dict[str, tuple[ScopeFrame, ...]] = field(default_factory=dict)
    no_grad: frozenset[str] = frozenset()
    output_containers: frozenset[str] = frozenset()
    opaque: dict[str, str] = field(default_factory=dict)
    constants: tuple[str, ...] = ()
    inputs: tuple = ()
    frontend: str = "fx"
    calls: dict[ScopeFrame, ModuleCall] = field(default_factory=dict)
    flag_readers: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    automatic: tuple[str, ...] = ()
    runtime: str = "graph"
    batch: int | None = None

    def scope(self, node: fx.Node | str) -> tuple[ScopeFrame, ...]:
        """The module calls ``node`` was recorded inside (outermost first)."""
        return self.scopes.get(node if isinstance(node, str) else node.name, ())


def frames_from_module_stack(root: nn.Module, node: fx.Node) -> tuple[ScopeFrame, ...]:
    """Scopes from fx's and export's ``nn_module_stack`` (keys ``name`` or ``name@k`` for repeats).

    Entries that name no submodule of ``root`` (export's bookkeeping frames) are dropped.
    """
    stack = node.meta.get("nn_module_stack") or {}
    frames = []
    for key, value in stack.items():
        name, module_type = value[0], value[1]
        call = int(key.rsplit("@", 1)[1]) if "@" in key and key.rsplit("@", 1)[1].isdigit() else 0
        if not name:
            continue
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module_type, type):
            module_type = type(module)
        frames.append(ScopeFrame(name, module_type, call))
    return tuple(frames)
