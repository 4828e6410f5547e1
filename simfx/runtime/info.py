"""``sim.simfx_info``: the plain-data record of what a transform did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["SimInfo"]


@dataclass(frozen=True)
class SimInfo:
    """Plain-data record of a transform, kept on the module as ``simfx_info``.

    ``plan`` holds the chosen blocks with their options and a decision for every
    candidate in ``candidates``; ``opaque`` the modules kept opaque and why.
    ``calls`` names the blocks that run as calls of their module in the training
    graph; ``traced`` the modules whose code was traced into it.

    About the nodes of ``sim.graph``, by name: ``nodes`` maps each block to its
    input, output and loss nodes; ``inserted`` are the nodes simfx added;
    ``boundary_of`` maps nodes to the block they belong to or were inserted for;
    ``scopes`` gives the module calls each node was recorded inside.

    ``runtime`` says what trains: ``"graph"`` (``sim.graph``) or ``"model"`` (the
    model's own forward, ``sim.graph`` being the analysed picture of it); ``taps``
    then says where each block's input and output are read.

    ``notes`` say what simfx passes to the forward beyond the example
    (``use_cache=False``). ``check`` says what the transform-time check found
    (``"passed"``, or why it was skipped).
    """

    plan: Any
    candidates: tuple = ()
    opaque: Mapping[str, str] = field(default_factory=dict)
    example_shapes: tuple[tuple[int, ...] | None, ...] = ()
    per_block: bool = False
    loss_in_output: bool = False
    frontend: str = "fx"
    calls: tuple[str, ...] = ()
    traced: tuple[str, ...] = ()
    nodes: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    inserted: frozenset[str] = frozenset()
    boundary_of: Mapping[str, str] = field(default_factory=dict)
    scopes: Mapping[str, tuple] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    check: str = "not run"
    runtime: str = "graph"
    taps: Mapping[str, tuple[str, str]] = field(default_factory=dict)
