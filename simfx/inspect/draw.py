"""Inspect stage — :func:`draw`: a picture of the rewritten training graph.

Two views of the same graph:

* **collapsed** (default): one box per SIM block, per top-level module and per
  free-standing op, so a ResNet-50 fits on a screen;
* **full**: one box per fx node, each SIM boundary drawn as a cluster around its
  nodes.

Either way the inserted reconstructors (``simfx.<block>`` nodes) are orange boxes
beside their block, fed by the block's input (dashed) and output (solid), and
their losses run down an orange bus into the ``sim_loss`` node. Shape-arithmetic
nodes (``x.shape``, asserts) and parameter reads are left out: they carry no
activation.

Rendering uses graphviz's ``dot`` when it is installed and otherwise a built-in
layered layout drawn with matplotlib; both write SVG (or PNG, or the DOT source,
by the file's suffix).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from torch import nn

from .explain import _count
from ..runtime.module import SimGraphModule
from .graphs import to_networkx
from ..runtime.module import NAMESPACE

__all__ = ["draw"]

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


def draw(
    sim: nn.Module,
    path: str | os.PathLike,
    *,
    full: bool = False,
    engine: str = "auto",
    example_inputs: Any = None,
    title: str | None = None,
) -> Path:
    """Draw the rewritten training graph of ``sim`` to ``path``.

    Args:
        sim: the module :func:`simfx.transform` returned.
        path: output file. ``.svg`` (usual), ``.png``, or ``.dot`` (graphviz source).
        full: one box per fx node instead of one per block / top-level module.
        engine: ``"auto"`` (graphviz ``dot`` if on PATH, else matplotlib),
            ``"dot"`` or ``"matplotlib"``.
        example_inputs: inputs for the shapes printed in the boxes (default: the
            shapes the transform saw).
        title: heading of the picture.

    Returns:
        The path written.

    >>> import tempfile, os, torch, torchvision, simfx
    >>> sim = simfx.transform(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    >>> out = simfx.draw(sim, os.path.join(tempfile.mkdtemp(), "resnet18.svg"))
    >>> out.read_text().count("layer1.0") > 0
    True
    """
    if not isinstance(sim, SimGraphModule):
        raise TypeError(f"simfx.draw expects the module simfx.transform returned, got {type(sim).__name__}.")
    if engine not in ("auto", "dot", "matplotlib"):
        raise ValueError(f"engine must be 'auto', 'dot' or 'matplotlib', got {engine!r}.")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png", ".dot"):
        raise ValueError(f"simfx.draw writes .svg, .png or .dot files; got '{path.name}'.")
    dot = shutil.which("dot")
    if engine == "dot" and dot is None and suffix != ".dot":
        raise RuntimeError("engine='dot' needs graphviz's `dot` on PATH (e.g. apt-get install graphviz); "
                           "engine='auto' falls back to matplotlib.")
    view = build_view(sim, full=full, example_inputs=example_inputs)
    title = title or _default_title(view, full)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".dot":
        path.write_text(to_dot(view, title))
    elif dot is not None and engine in ("auto", "dot"):
        _run_dot(dot, to_dot(view, title), path, suffix[1:])
    else:
        _draw_matplotlib(view, path, title, full)
    return path


# --- the view graph -----------------------------------------------------------


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


def _shape_text(shape) -> str:
    """Shape without the batch axis: ``(2, 64, 16, 16)`` -> ``64x16x16``."""
    if not shape or not all(isinstance(s, int) for s in shape):
        return ""
    return "x".join(str(s) for s in shape[1:]) or "scalar"


def _label(unit: str, attrs: dict, last: dict, module_type, blocks, params, full) -> str:
    kind = attrs["kind"]
    shape = _shape_text(last["shape"])
    if kind == "sim":
        block = blocks[attrs["cluster"]]
        # In the full view the cluster already names the block.
        head = "SIM (inserted)" if full else f"SIM {block.name}"
        return f"{head}\n{block.options.objective} · {_count(params[block.name])} params"
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


def _default_title(view: nx.DiGraph, full: bool) -> str:
    blocks = sum(1 for _, k in view.nodes(data="kind") if k == "sim")
    what = "full view: one box per graph node" if full else "collapsed view: one box per block or module"
    return f"simfx: training graph with SIM on {blocks} blocks ({what})"


# --- graphviz -------------------------------------------------------------------


def to_dot(view: nx.DiGraph, title: str) -> str:
    """DOT source for ``view``: boundaries as clusters, reconstructors beside their block."""

    def quote(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    ids = {n: f"n{i}" for i, n in enumerate(view.nodes)}
    lines = [
        "digraph simfx {",
        f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, labelloc=t, label={quote(title)}, "
        "nodesep=0.25, ranksep=0.3, newrank=true, concentrate=true];",
        "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=9, margin=\"0.08,0.03\"];",
        "  edge [arrowsize=0.6, color=\"#6f6f6f\"];",
    ]
    clusters: dict[str, list[str]] = {}
    for n, attrs in view.nodes(data=True):
        if attrs["cluster"]:
            clusters.setdefault(attrs["cluster"], []).append(n)

    def node_line(n, indent="  "):
        attrs = view.nodes[n]
        fill, border = COLOURS[attrs["kind"]]
        return (f"{indent}{ids[n]} [id={quote('box_' + n)}, label={quote(attrs['label'])}, "
                f"fillcolor=\"{fill}\", color=\"{border}\"];")

    for i, (name, members) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={quote(name)}; id={quote('cluster_' + name)}; style=\"rounded,filled,dashed\"; "
                     f"fillcolor=\"{CLUSTER[0]}\"; color=\"{CLUSTER[1]}\"; fontsize=9;")
        lines += [node_line(n, "    ") for n in members]
        sims = [ids[n] for n in members if view.nodes[n]["kind"] == "sim"]
        exits = [ids[n] for n in members if view.nodes[n]["kind"] in ("block", "op")]
        if sims and exits:
            lines.append(f"    {{rank=same; {exits[-1]}; {' '.join(sims)};}}")
        lines.append("  }")
    lines += [node_line(n) for n, attrs in view.nodes(data=True) if not attrs["cluster"]]
    for a, b, kind in view.edges(data="kind"):
        # Flat y edges put each reconstructor right of its block; the x edges must not
        # pull ranks; loss edges rank sim_loss below the last reconstructor.
        style = {"x": ", style=dashed, constraint=false", "y": "", "loss": ", penwidth=0.8"}
        lines.append(f"  {ids[a]} -> {ids[b]} [color=\"{EDGE[kind]}\"{style.get(kind, '')}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _run_dot(dot: str, source: str, path: Path, fmt: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".dot", delete=False) as f:
        f.write(source)
    try:
        subprocess.run([dot, f"-T{fmt}", "-o", str(path), f.name], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"graphviz dot failed: {error.stderr.strip().splitlines()[-1:]}; "
                           f"use engine='matplotlib'.") from None
    finally:
        os.unlink(f.name)


# --- built-in layered layout (matplotlib) ------------------------------------------


@dataclass
class _Geometry:
    slot: float  # inches between box centres, across
    row: float  # inches between box centres, down
    box_w: float
    box_h: float
    font: float
    label_margin: float  # room left of each column for cluster names
    top: float = 0.95
    bottom: float = 0.35
    bus: float = 0.28


def _ranks(view: nx.DiGraph) -> dict[str, int]:
    """Layer of every box: longest path from the inputs; reconstructors sit beside their block."""
    main = [n for n, k in view.nodes(data="kind") if k not in ("sim", "loss")]
    order = {n: view.nodes[n]["order"] for n in view.nodes}
    dag = nx.DiGraph()
    dag.add_nodes_from(main)
    # Edges against graph order (a module called twice with work in between) would close a cycle.
    dag.add_edges_from((a, b) for a, b in view.edges() if a in dag and b in dag and order[a] < order[b])
    rank: dict[str, int] = {}
    for n in nx.lexicographical_topological_sort(dag, key=lambda n: order[n]):
        preds = list(dag.predecessors(n))
        rank[n] = max((rank[p] + 1 for p in preds), default=0)
    # Sources that are not inputs (a tensor built from a parameter) go just above their first use.
    for n in main:
        if dag.in_degree(n) == 0 and view.nodes[n]["kind"] != "io" and dag.out_degree(n):
            rank[n] = max(0, min(rank[s] for s in dag.successors(n)) - 1)
    output = [n for n in main if view.nodes[n]["kind"] == "io" and not view.in_degree(n) == 0]
    for n, kind in view.nodes(data="kind"):
        if kind == "sim":
            exits = [p for p, k in view.in_edges(n) if view.edges[p, n]["kind"] == "y"] or list(view.predecessors(n))
            rank[n] = max(rank.get(p, 0) for p in exits) if exits else 0
    last = max(rank.values(), default=0)
    for n in output:
        rank[n] = max(rank[n], last)
    for n, kind in view.nodes(data="kind"):
        if kind == "loss":
            rank[n] = max((rank[s] for s in view.successors(n)), default=last)
    return rank


def _slots(view: nx.DiGraph, rank: dict[str, int]) -> dict[str, int]:
    """Position across each layer: the main path stays in slot 0, branches to its right."""
    slot: dict[str, float] = {}
    layers: dict[int, list[str]] = {}
    for n in sorted(view.nodes, key=lambda n: view.nodes[n]["order"]):
        if view.nodes[n]["kind"] not in ("sim", "loss"):
            layers.setdefault(rank[n], []).append(n)
    for r in sorted(layers):
        def centre(n):
            preds = [slot[p] for p in view.predecessors(n) if p in slot]
            return sum(preds) / len(preds) if preds else 0.0
        for i, n in enumerate(sorted(layers[r], key=lambda n: (centre(n), view.nodes[n]["order"]))):
            slot[n] = i
    # Reconstructors share one slot column right of the widest layer their blocks span
    # (so the x tap running down to them crosses no box); a second block in a layer
    # moves one slot further.
    span: dict[str, list[int]] = {}
    for n, cluster in view.nodes(data="cluster"):
        if cluster and view.nodes[n]["kind"] not in ("sim", "loss"):
            span.setdefault(cluster, []).append(rank[n])
    widths = [len(layers.get(r, ())) for ranks in span.values() for r in range(min(ranks), max(ranks) + 1)]
    width = max(widths or [len(layers.get(rank[n], ())) for n in view.nodes] or [1])
    used: dict[int, int] = {}
    for n in sorted(view.nodes, key=lambda n: view.nodes[n]["order"]):
        if view.nodes[n]["kind"] in ("sim", "loss"):
            slot[n] = width + used.get(rank[n], 0)
            used[rank[n]] = used.get(rank[n], 0) + 1
    return {n: int(s) for n, s in slot.items()}


def _draw_matplotlib(view: nx.DiGraph, path: Path, title: str, full: bool) -> None:
    # A bare Figure, not pyplot: no GUI backend, and the caller's backend stays as it was.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    from matplotlib.path import Path as MPath

    clusters = {c for _, c in view.nodes(data="cluster") if c}
    label_margin = (max((len(c) for c in clusters), default=0) * 0.052 + 0.25) if full else 0.15
    geo = _Geometry(slot=1.75, row=0.52, box_w=1.55, box_h=0.40, font=6.2, label_margin=label_margin) if full \
        else _Geometry(slot=2.35, row=0.66, box_w=2.1, box_h=0.50, font=7.4, label_margin=label_margin)

    rank = _ranks(view)
    slot = _slots(view, rank)
    n_ranks = max(rank.values()) + 1
    n_slots = max(slot.values()) + 1
    column_w = geo.label_margin + n_slots * geo.slot + geo.bus + 0.3
    # Wrap the layers into columns so the picture is about 4:3 rather than one long strip.
    columns = max(1, min(n_ranks, round(math.sqrt(n_ranks * geo.row * 4 / 3 / column_w))))
    rows = math.ceil(n_ranks / columns)
    columns = math.ceil(n_ranks / rows)
    width = max(columns * column_w, 7.5)
    height = geo.top + rows * geo.row + geo.bottom + 0.2

    def column_of(n):
        return rank[n] // rows

    def centre(n):
        col = column_of(n)
        x = col * column_w + geo.label_margin + slot[n] * geo.slot + geo.slot / 2
        y = geo.top + (rank[n] % rows) * geo.row + geo.row / 2
        return x, y

    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.axis("off")
        ax.text(0.15, 0.28, title, fontsize=10, weight="bold", va="center")
        handles = [Patch(facecolor=COLOURS[k][0], edgecolor=COLOURS[k][1], label=text) for k, text in LEGEND]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.15 / width, 1 - 0.45 / height), ncol=5,
                  fontsize=7, frameon=False, handlelength=1.4, borderaxespad=0, columnspacing=1.2,
                  title=SHAPES_NOTE, title_fontsize=7, alignment="left")

        # Clusters first, underneath: one rounded band per boundary and column.
        for name in sorted(clusters):
            members = [n for n, c in view.nodes(data="cluster") if c == name]
            for part, col in enumerate(sorted({column_of(n) for n in members})):
                pts = [centre(n) for n in members if column_of(n) == col]
                x0 = min(x for x, _ in pts) - geo.box_w / 2 - 0.07
                x1 = max(x for x, _ in pts) + geo.box_w / 2 + 0.07
                y0 = min(y for _, y in pts) - geo.box_h / 2 - 0.03
                y1 = max(y for _, y in pts) + geo.box_h / 2 + 0.03
                band = FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.06",
                                      facecolor=CLUSTER[0], edgecolor=CLUSTER[1], linestyle="--", linewidth=0.8,
                                      zorder=0)
                band.set_gid(f"cluster_{name}" if part == 0 else f"cluster_{name}-{part}")  # ids stay unique
                ax.add_patch(band)
                if full:
                    ax.text(x0 - 0.06, y0 + 0.05, name, fontsize=geo.font + 0.6, color=CLUSTER[1], ha="right",
                            va="top", weight="bold", zorder=1)

        for n, attrs in view.nodes(data=True):
            x, y = centre(n)
            fill, border = COLOURS[attrs["kind"]]
            box = FancyBboxPatch((x - geo.box_w / 2, y - geo.box_h / 2), geo.box_w, geo.box_h,
                                 boxstyle="round,pad=0,rounding_size=0.05", facecolor=fill, edgecolor=border,
                                 linewidth=1.1 if attrs["kind"] in ("block", "sim", "loss") else 0.7, zorder=3)
            box.set_gid(f"box_{n}")
            ax.add_patch(box)
            lines = attrs["label"].split("\n")
            ax.text(x, y, "\n".join(lines), fontsize=geo.font, ha="center", va="center", zorder=4,
                    linespacing=1.15, weight="normal")

        def arrow(verts, kind, *, head=True):
            codes = [MPath.MOVETO] + [MPath.LINETO] * (len(verts) - 1)
            patch = FancyArrowPatch(path=MPath(verts, codes), arrowstyle="-|>" if head else "-",
                                    mutation_scale=7, color=EDGE[kind], linewidth=0.9 if kind == "data" else 1.0,
                                    linestyle="--" if kind == "x" else "-", zorder=2, shrinkA=0, shrinkB=0)
            ax.add_patch(patch)

        half_w, half_h = geo.box_w / 2, geo.box_h / 2
        bottom_y = geo.top + rows * geo.row + 0.1
        top_y = geo.top - 0.02
        for a, b, kind in view.edges(data="kind"):
            (ax_, ay), (bx, by) = centre(a), centre(b)
            if kind == "loss":
                continue  # drawn as the bus below
            if kind == "x":
                # The reconstructor's x taps the arrow entering its block: no long diagonals.
                first = min((n for n, c in view.nodes(data="cluster")
                             if c == view.nodes[b]["cluster"] and view.nodes[n]["kind"] in ("block", "op")
                             and column_of(n) == column_of(b)), key=lambda n: (rank[n], slot[n]), default=None)
                if first is None:
                    continue
                fx_, fy = centre(first)
                tap = fy - half_h - (geo.row - geo.box_h) / 2
                arrow([(fx_, tap), (bx, tap), (bx, by - half_h)], kind)
            elif kind == "y":
                if abs(ay - by) < 1e-6:
                    arrow([(ax_ + half_w, ay), (bx - half_w, by)], kind)
                else:
                    arrow([(ax_ + half_w, ay), (bx - half_w * 1.2, ay), (bx - half_w * 1.2, by),
                           (bx - half_w, by)], kind)
            elif column_of(a) != column_of(b):
                gap = column_of(b) * column_w + geo.label_margin * 0.5
                arrow([(ax_, ay + half_h), (ax_, bottom_y), (gap, bottom_y), (gap, top_y), (bx, top_y),
                       (bx, by - half_h)], kind)
            elif rank[b] - rank[a] == 1:
                arrow([(ax_, ay + half_h), (bx, by - half_h)], kind)
            elif slot[a] == slot[b]:
                # A skip over boxes in the same slot runs down their left side.
                side = ax_ - half_w - 0.09
                arrow([(ax_ - half_w, ay), (side, ay), (side, by), (bx - half_w, by)], kind)
            else:
                arrow([(ax_, ay + half_h), (ax_, by - half_h - geo.row * 0.25), (bx, by - half_h)], kind)
        _loss_bus(ax, view, centre, column_of, arrow, geo, half_w, half_h,
                  bus_x=lambda col: col * column_w + geo.label_margin + n_slots * geo.slot + geo.bus / 2 + 0.02,
                  bottom_y=bottom_y + 0.12)

        fig.savefig(path, format=path.suffix[1:], dpi=150 if path.suffix == ".png" else None)


def _loss_bus(ax, view, centre, column_of, arrow, geo, half_w, half_h, *, bus_x, bottom_y) -> None:
    """Every reconstructor feeds a vertical orange line right of its column; the lines of
    earlier columns join along the bottom and run into ``sim_loss``."""
    sims = [n for n, k in view.nodes(data="kind") if k == "sim"]
    loss = next((n for n, k in view.nodes(data="kind") if k == "loss"), None)
    if not sims or loss is None:
        return
    line = dict(color=EDGE["loss"], linewidth=1.0, zorder=2)
    lx, ly = centre(loss)
    last = column_of(loss)
    columns = sorted({column_of(n) for n in sims})
    for col in columns:
        ys = [centre(n)[1] for n in sims if column_of(n) == col]
        for n in sims:
            if column_of(n) == col:
                x, y = centre(n)
                ax.plot([x + half_w, bus_x(col)], [y, y], **line)
        if col != last:
            ax.plot([bus_x(col), bus_x(col), bus_x(last)], [min(ys), bottom_y, bottom_y], **line)
    feeders = [centre(n)[1] for n in sims if column_of(n) == last]
    top = min(feeders + [ly])
    low = bottom_y if any(c != last for c in columns) else max(feeders + [ly])
    ax.plot([bus_x(last), bus_x(last)], [top, low], **line)
    arrow([(bus_x(last), ly), (lx + half_w, ly)], "loss")
    for target in view.successors(loss):
        tx, ty = centre(target)
        if abs(ty - ly) < 1e-6:
            arrow([(lx - half_w, ly), (tx + half_w, ty)], "loss")
        else:
            arrow([(lx, ly + half_h), (tx + half_w * 0.5, ty - half_h)], "loss")
