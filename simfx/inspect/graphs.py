"""Inspect stage — the rewritten graph as data: :func:`to_networkx` and :func:`graph_diff`.

``to_networkx`` turns an fx graph into a ``networkx.DiGraph`` (one node per fx
node, one edge per use) with the attributes a user filters on: ``op``,
``target``, ``shape``, ``boundary`` and ``inserted``. ``graph_diff`` lists what
the pass changed: the nodes it added and the edges it added or removed, found by
comparing the training graph with the same graph stripped of SIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..analysis.shapes import TensorMeta, propagate_shapes
from ..emit.rewrite import plain_graph
from ..runtime.module import SimGraphModule

__all__ = ["to_networkx", "graph_diff", "GraphDiff", "node_shapes", "target_name"]


def target_name(node: fx.Node) -> str:
    """A short readable name of what a node calls: ``layer1.0.conv1``, ``add``, ``flatten``."""
    if node.op in ("call_module", "get_attr", "call_method"):
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) or str(node.target)
    return node.name if node.op == "placeholder" else node.op


def node_shapes(gm: fx.GraphModule, example_inputs: Any = None) -> dict[str, tuple[int, ...] | tuple]:
    """Shapes of every tensor value of ``gm.graph``, from a fake-tensor run (nothing real executes).

    ``example_inputs`` defaults to float tensors of the shapes a simfx transform saw.
    Returns ``{}`` when no inputs are known or the graph cannot run on them.
    """
    inputs = example_inputs_for(gm, example_inputs)
    if inputs is None:
        return {}
    try:
        metas = propagate_shapes(gm.graph, gm, inputs).metas
    except Exception:  # a picture or a graph without shapes beats no answer at all
        return {}
    return {name: _plain_shape(meta) for name, meta in metas.items()}


def to_networkx(gm: fx.GraphModule, example_inputs: Any = None) -> nx.DiGraph:
    """The graph of ``gm`` (the training graph of a transformed module) as a ``networkx.DiGraph``.

    Nodes are fx node names, in graph order, with attributes:

    * ``op`` (``placeholder``, ``call_module``, ...), ``target`` (readable string),
      ``order`` (position in the graph);
    * ``shape``: tensor shape at the example inputs (a tuple of shapes for tuple
      values, None for non-tensors or when unknown);
    * ``boundary``: name of the SIM boundary the node belongs to or was inserted
      for (None if neither);
    * ``inserted``: True for the nodes simfx added (reconstructor calls, the loss
      aggregate);
    * ``module``: qualified name of the innermost module call that recorded it
      ("" at the top level), ``module_type``, and ``scope``: every enclosing module
      call, outermost first (``name@k`` for a module's k-th repeated call).

    Edges go from a value to each node using it. The graph also carries
    ``graph.graph["boundaries"]`` (names of the SIM boundaries, in order).

    >>> import torch, torchvision, simfx
    >>> sim = simfx.transform(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> g = simfx.to_networkx(sim)
    >>> g.nodes["layer1_0_conv1"]["shape"], g.nodes["layer1_0_conv1"]["boundary"]
    ((2, 64, 16, 16), 'layer1.0')
    >>> sorted(n for n, inserted in g.nodes(data="inserted") if inserted)[:2]
    ['aggregate_losses', 'simfx_layer1_0']
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"to_networkx expects a torch.fx.GraphModule (e.g. what simfx.transform returns), got {type(gm).__name__}."
        )
    shapes = node_shapes(gm, example_inputs)
    graph = nx.DiGraph()
    info = getattr(gm, "simfx_info", None)
    graph.graph["boundaries"] = list(info.plan.names) if info is not None else []
    scopes = info.scopes if info is not None else {}
    boundary_of = info.boundary_of if info is not None else {}
    inserted = info.inserted if info is not None else frozenset()
    for order, node in enumerate(gm.graph.nodes):
        scope = scopes.get(node.name, ())
        graph.add_node(
            node.name,
            op=node.op,
            target=target_name(node),
            order=order,
            shape=shapes.get(node.name),
            boundary=boundary_of.get(node.name),
            inserted=node.name in inserted,
            module=scope[-1].name if scope else "",
            module_type=scope[-1].type.__name__ if scope else "",
            scope=tuple(frame.key for frame in scope),
        )
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


@dataclass(frozen=True)
class GraphDiff:
    """What the pass changed in the training graph.

    ``added_nodes``: fx node names simfx inserted, in graph order;
    ``added_edges`` / ``removed_edges``: ``(source, user)`` pairs by node name.
    """

    added_nodes: tuple[str, ...]
    added_edges: tuple[tuple[str, str], ...]
    removed_edges: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"{len(self.added_nodes)} nodes added:"]
        lines += [f"  + {name}" for name in self.added_nodes]
        lines.append(f"{len(self.added_edges)} edges added:")
        lines += [f"  + {a} -> {b}" for a, b in self.added_edges]
        lines.append(f"{len(self.removed_edges)} edges removed:")
        lines += [f"  - {a} -> {b}" for a, b in self.removed_edges]
        return "\n".join(lines)

    __repr__ = __str__


def graph_diff(sim: nn.Module) -> GraphDiff:
    """Nodes and edges that :func:`simfx.transform` added to (or removed from) the model's graph.

    >>> import torch, torchvision, simfx
    >>> sim = simfx.transform(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> diff = simfx.graph_diff(sim)
    >>> len(diff.added_nodes), diff.removed_edges
    (9, ())
    >>> ("layer1_0_relu_1", "simfx_layer1_0") in diff.added_edges
    True
    """
    if not isinstance(sim, SimGraphModule):
        raise TypeError(f"graph_diff expects the module simfx.transform returned, got {type(sim).__name__}.")
    before = _edges(plain_graph(sim))
    after = _edges(sim.graph)
    order = {n.name: i for i, n in enumerate(sim.graph.nodes)}

    def by_order(edges):
        return tuple(sorted(edges, key=lambda e: (order.get(e[1], -1), order.get(e[0], -1))))

    return GraphDiff(
        added_nodes=tuple(n.name for n in sim.graph.nodes if n.name in sim.simfx_info.inserted),
        added_edges=by_order(after - before),
        removed_edges=by_order(before - after),
    )


def _edges(graph: fx.Graph) -> set[tuple[str, str]]:
    return {(source.name, node.name) for node in graph.nodes for source in node.all_input_nodes}


def example_inputs_for(gm: nn.Module, example_inputs: Any = None) -> tuple | None:
    """``example_inputs`` as a tuple, or float zeros of the shapes a simfx transform saw (None if unknown)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if example_inputs is not None:
        return tuple(example_inputs)
    info = getattr(gm, "simfx_info", None)
    shapes = getattr(info, "example_shapes", ())
    if not shapes or any(s is None for s in shapes):
        return None
    return tuple(torch.zeros(s) for s in shapes)


def _plain_shape(meta: Any):
    if isinstance(meta, TensorMeta):
        return meta.shape
    if isinstance(meta, tuple):
        return tuple(m.shape for m in meta if isinstance(m, TensorMeta))
    return None
