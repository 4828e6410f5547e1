"""What :func:`simfx.draw` draws: the rewritten training graph as a graph of boxes, whatever the engine.

Two views of the same graph:

* **collapsed** (default): one box per SIM block, per top-level module and per
  free-standing op, so a ResNet-50 fits on a screen;
* **full**: one box per fx node, each SIM boundary a cluster around its nodes.

Either way the inserted reconstructors (``simfx.<block>`` nodes) are boxes beside
their block, fed by the block's input (edge kind ``x``) and output (``y``), and
their losses run into the ``sim_loss`` node (``loss``). Shape-arithmetic nodes
(``x.shape``, asserts) and parameter reads are left out: they carry no
activation. The colours every engine uses are here too.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from ..runtime.module import NAMESPACE, SimGraphModule
from .graphs import to_networkx
from .text import count_text, shape_text

__all__ = ["build_view", "default_title", "COLOURS", "CLUSTER", "EDGE", "LEGEND", "SHAPES_NOTE"]

# kind -> (fill, border)
COLOURS = {
    "io": ("#d8f0d8", "#4d8f4d"),
    "op": ("#f4f4f4", "#9a9a9a"),
    "module": ("#e8e8e8", "#7a7a7a"),
    "block": ("#cfe2f3", "#3d6fa5"),
    "sim": ("#fbd38d", "#c76b12"),
    "loss": ("#f6b2a8", "#b03a2e"),
}
CLUSTER = ("#eef4fb", "#8fb0d6")
EDGE = {"data": "#6f6f6f", "x": "#c76b12", "y": "#c76b12", "loss": "#c76b12"}
LEGEND = (
    ("io", "input / output"),
    ("op", "original op or module"),
    ("block", "block with SIM (boundary)"),
    ("sim", "inserted reconstructor"),
    ("loss", "sim_loss aggregate"),
)
SHAPES_NOTE = "shapes per sample (batch axis left out)"


def build_view(sim: SimGraphModule, *, full: bool = False, example_inputs: Any = None) -> nx.DiGraph:
    """The graph that gets drawn: one node per box, with ``label``, ``kind``, ``cluster``, ``order``.

    Edge attribute ``kind`` is ``data``, ``x``/``y`` (a reconstructor reading the
    block's input/output) or ``loss``.
    """
    g = to_networkx(sim, example_inputs)
    info = sim.simfx_info
    heads = sim.get_submodule(NAMESPACE)
    blocks = {b.name: b for b in info.plan.blocks}
    params = {b.name: sum(p.numel() for p in heads.get_submodule(b.key).parameters()) for b in info.plan.blocks}
    has_shapes = any(a["shape"] is not None for _, a in g.nodes(data=True))

    def module_type(name: str) -> str:
        try:
            return type(sim.get_submodule(name)).__name__
        except AttributeError:
            return ""

    def visible(node, attrs):
        if attrs["op"] in ("placeholder", "output", "call_module") or attrs["inserted"]:
            return True
        if attrs["op"] == "get_attr":
            return False  # parameter reads carry no activation
        if attrs["shape"] is not None or not has_shapes:
            return True
        # Shape arithmetic (x.shape[0], asserts) is left out, but not a call returning a
        # tuple that holds a tensor, e.g. attention's (output, None).
        return any(g.nodes[u]["target"] == "getitem" and g.nodes[u]["shape"] for u in g.successors(node))

    unit_of = {n: _unit(n, a, blocks, full) for n, a in g.nodes(data=True) if visible(n, a)}
    view = nx.DiGraph()
    for n, a in sorted(g.nodes(data=True), key=lambda item: item[1]["order"]):
        if n not in unit_of:
            continue
        unit, kind, cluster = unit_of[n]
        if unit not in view:
            view.add_node(unit, kind=kind, cluster=cluster, order=a["order"], members=[])
        view.nodes[unit]["members"].append(n)
    for unit, attrs in view.nodes(data=True):
        last = g.nodes[attrs["members"][-1]]
        attrs["label"] = _label(unit, attrs, last, module_type, blocks, params, full)
    for source, target in g.edges():
        if source not in unit_of or target not in unit_of:
            continue
        su, tu = unit_of[source][0], unit_of[target][0]
        if su == tu:
            continue
        view.add_edge(su, tu, kind=_edge_kind(view, su, tu, source, g, blocks))
    return view


def _unit(node: str, a: dict, blocks: dict, full: bool) -> tuple[str, str, str | None]:
    """(box id, kind, cluster) of one fx node."""
    boundary = a["boundary"]
    if a["inserted"]:
        return (f"sim:{boundary}", "sim", boundary) if boundary else ("sim_loss", "loss", None)
    if a["op"] in ("placeholder", "output"):
        return node, "io", None
    if full:
        return node, "op", boundary
    if boundary in blocks:
        return f"block:{boundary}", "block", boundary
    # The outermost module call that holds no SIM block becomes one box.
    for key in a["scope"]:
        name = key.split("@")[0]
        if not any(b == name or b.startswith(name + ".") for b in blocks):
            return f"module:{key}", "module", None
    return node, "op", None


def _edge_kind(view, su, tu, source, g, blocks) -> str:
    if view.nodes[tu]["kind"] == "loss" or view.nodes[su]["kind"] == "loss":
        return "loss"
    if view.nodes[tu]["kind"] == "sim":
        block = blocks[view.nodes[tu]["cluster"]].boundary
        return "y" if source == block.exit else "x"
    return "data"


def _label(unit: str, attrs: dict, last: dict, module_type, blocks, params, full) -> str:
    kind = attrs["kind"]
    shape = shape_text(last["shape"], batch=False) if last["shape"] else ""
    if kind == "sim":
        block = blocks[attrs["cluster"]]
        # In the full view the cluster already names the block.
        head = "SIM (inserted)" if full else f"SIM {block.name}"
        return f"{head}\n{block.options.objective} · {count_text(params[block.name])} params"
    if kind == "loss":
        return f"sim_loss\nbeta · mean of {len(blocks)} losses"
    if kind == "block":
        b = blocks[attrs["cluster"]].boundary
        return f"{b.name}\n{b.type_name}{' · residual' if b.residual else ''}\n{shape}"
    if kind == "io":
        if last["op"] == "output":
            return "output\n(out, sim_loss)"
        return f"input {last['target']}\n{shape}"
    if kind == "module":
        key = unit.split(":", 1)[1]
        return f"{key}\n{module_type(key.split('@')[0])}\n{shape}"
    target = last["target"]
    if full and attrs["cluster"] and last["op"] == "call_module" and target.startswith(attrs["cluster"] + "."):
        target = target[len(attrs["cluster"]) + 1:]  # the cluster already names the block
    lines = [_clip(target, 26)]
    if last["op"] == "call_module" and last["module_type"]:
        lines.append(last["module_type"])
    return "\n".join(lines + ([shape] if shape else []))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def default_title(view: nx.DiGraph, full: bool) -> str:
    blocks = sum(1 for _, k in view.nodes(data="kind") if k == "sim")
    what = "full view: one box per graph node" if full else "collapsed view: one box per block or module"
    return f"simfx: training graph with SIM on {blocks} blocks ({what})"
