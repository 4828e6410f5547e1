"""Small torch.fx helpers every stage uses: copying a graph, finding its output, resolving a target."""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["copy_graph", "output_node", "fetch_attr"]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with the same node names, metadata and code generator."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    value_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, value_map)
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def output_node(graph: fx.Graph) -> fx.Node:
    """The graph's ``output`` node."""
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute a dotted ``get_attr``/``call_module`` target names, or None."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
