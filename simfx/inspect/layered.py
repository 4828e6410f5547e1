"""The built-in engine of :func:`simfx.draw` when graphviz is missing: a layered layout drawn with matplotlib.

Boxes are placed in layers by the longest path from the inputs (:func:`_ranks`),
across each layer with the main path on the left (:func:`_slots`), and the layers
wrap into columns so the picture is about 4:3. Reconstructors sit right of their
block; their losses run down an orange bus into ``sim_loss``. A bare ``Figure``
is used, never pyplot: no GUI backend, and the caller's backend stays as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .view import CLUSTER, COLOURS, EDGE, LEGEND, SHAPES_NOTE

__all__ = ["draw_layered"]


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


@dataclass
class _Placement:
    """Where every box goes: layer (``rank``) and slot within it, layers wrapped into columns."""

    view: nx.DiGraph
    geo: _Geometry
    rank: dict[str, int]
    slot: dict[str, int]
    rows: int  # layers per column
    column_w: float

    @classmethod
    def of(cls, view: nx.DiGraph, geo: _Geometry) -> "_Placement":
        rank = _ranks(view)
        slot = _slots(view, rank)
        n_ranks = max(rank.values()) + 1
        column_w = geo.label_margin + (max(slot.values()) + 1) * geo.slot + geo.bus + 0.3
        # Wrap the layers into columns so the picture is about 4:3 rather than one long strip.
        columns = max(1, min(n_ranks, round(math.sqrt(n_ranks * geo.row * 4 / 3 / column_w))))
        rows = math.ceil(n_ranks / columns)
        return cls(view, geo, rank, slot, rows, column_w)

    @property
    def columns(self) -> int:
        return math.ceil((max(self.rank.values()) + 1) / self.rows)

    @property
    def size(self) -> tuple[float, float]:
        """Figure width and height in inches."""
        return max(self.columns * self.column_w, 7.5), self.geo.top + self.rows * self.geo.row + self.geo.bottom + 0.2

    @property
    def bottom_y(self) -> float:
        return self.geo.top + self.rows * self.geo.row + 0.1

    def column_of(self, n: str) -> int:
        return self.rank[n] // self.rows

    def centre(self, n: str) -> tuple[float, float]:
        geo = self.geo
        x = self.column_of(n) * self.column_w + geo.label_margin + self.slot[n] * geo.slot + geo.slot / 2
        y = geo.top + (self.rank[n] % self.rows) * geo.row + geo.row / 2
        return x, y

    def bus_x(self, column: int) -> float:
        """The loss bus of a column runs right of its widest layer."""
        slots = max(self.slot.values()) + 1
        return column * self.column_w + self.geo.label_margin + slots * self.geo.slot + self.geo.bus / 2 + 0.02


def draw_layered(view: nx.DiGraph, path: Path, title: str, full: bool) -> None:
    """Draw ``view`` into ``path`` (SVG or PNG by its suffix) with matplotlib."""
    import matplotlib
    from matplotlib.figure import Figure

    clusters = {c for _, c in view.nodes(data="cluster") if c}
    label_margin = (max((len(c) for c in clusters), default=0) * 0.052 + 0.25) if full else 0.15
    geo = _Geometry(slot=1.75, row=0.52, box_w=1.55, box_h=0.40, font=6.2, label_margin=label_margin) if full \
        else _Geometry(slot=2.35, row=0.66, box_w=2.1, box_h=0.50, font=7.4, label_margin=label_margin)
    place = _Placement.of(view, geo)
    width, height = place.size
    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.axis("off")
        _draw_heading(ax, title, width, height)
        _draw_clusters(ax, place, sorted(clusters), full)  # first, underneath
        _draw_boxes(ax, place)
        _draw_edges(ax, place)
        _loss_bus(ax, place)
        fig.savefig(path, format=path.suffix[1:], dpi=150 if path.suffix == ".png" else None)


def _draw_heading(ax, title: str, width: float, height: float) -> None:
    from matplotlib.patches import Patch

    ax.text(0.15, 0.28, title, fontsize=10, weight="bold", va="center")
    handles = [Patch(facecolor=COLOURS[k][0], edgecolor=COLOURS[k][1], label=text) for k, text in LEGEND]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.15 / width, 1 - 0.45 / height), ncol=5,
              fontsize=7, frameon=False, handlelength=1.4, borderaxespad=0, columnspacing=1.2,
              title=SHAPES_NOTE, title_fontsize=7, alignment="left")


def _draw_clusters(ax, place: _Placement, clusters: list[str], full: bool) -> None:
    """One rounded band per boundary and column."""
    from matplotlib.patches import FancyBboxPatch

    geo, view = place.geo, place.view
    for name in clusters:
        members = [n for n, c in view.nodes(data="cluster") if c == name]
        for part, col in enumerate(sorted({place.column_of(n) for n in members})):
            pts = [place.centre(n) for n in members if place.column_of(n) == col]
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


def _draw_boxes(ax, place: _Placement) -> None:
    from matplotlib.patches import FancyBboxPatch

    geo = place.geo
    for n, attrs in place.view.nodes(data=True):
        x, y = place.centre(n)
        fill, border = COLOURS[attrs["kind"]]
        box = FancyBboxPatch((x - geo.box_w / 2, y - geo.box_h / 2), geo.box_w, geo.box_h,
                             boxstyle="round,pad=0,rounding_size=0.05", facecolor=fill, edgecolor=border,
                             linewidth=1.1 if attrs["kind"] in ("block", "sim", "loss") else 0.7, zorder=3)
        box.set_gid(f"box_{n}")
        ax.add_patch(box)
        ax.text(x, y, attrs["label"], fontsize=geo.font, ha="center", va="center", zorder=4, linespacing=1.15)


def _arrow(ax, verts, kind: str, *, head: bool = True) -> None:
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MPath

    codes = [MPath.MOVETO] + [MPath.LINETO] * (len(verts) - 1)
    ax.add_patch(FancyArrowPatch(path=MPath(verts, codes), arrowstyle="-|>" if head else "-",
                                 mutation_scale=7, color=EDGE[kind], linewidth=0.9 if kind == "data" else 1.0,
                                 linestyle="--" if kind == "x" else "-", zorder=2, shrinkA=0, shrinkB=0))


def _draw_edges(ax, place: _Placement) -> None:
    """Data edges between boxes, and each reconstructor's x and y taps (loss edges are the bus)."""
    view, geo = place.view, place.geo
    half_w, half_h = geo.box_w / 2, geo.box_h / 2
    for a, b, kind in view.edges(data="kind"):
        (ax_, ay), (bx, by) = place.centre(a), place.centre(b)
        if kind == "loss":
            continue
        if kind == "x":
            # The reconstructor's x taps the arrow entering its block: no long diagonals.
            first = min((n for n, c in view.nodes(data="cluster")
                         if c == view.nodes[b]["cluster"] and view.nodes[n]["kind"] in ("block", "op")
                         and place.column_of(n) == place.column_of(b)),
                        key=lambda n: (place.rank[n], place.slot[n]), default=None)
            if first is None:
                continue
            fx_, fy = place.centre(first)
            tap = fy - half_h - (geo.row - geo.box_h) / 2
            _arrow(ax, [(fx_, tap), (bx, tap), (bx, by - half_h)], kind)
        elif kind == "y":
            if abs(ay - by) < 1e-6:
                _arrow(ax, [(ax_ + half_w, ay), (bx - half_w, by)], kind)
            else:
                _arrow(ax, [(ax_ + half_w, ay), (bx - half_w * 1.2, ay), (bx - half_w * 1.2, by),
                            (bx - half_w, by)], kind)
        elif place.column_of(a) != place.column_of(b):
            gap = place.column_of(b) * place.column_w + geo.label_margin * 0.5
            top_y = geo.top - 0.02
            _arrow(ax, [(ax_, ay + half_h), (ax_, place.bottom_y), (gap, place.bottom_y), (gap, top_y),
                        (bx, top_y), (bx, by - half_h)], kind)
        elif place.rank[b] - place.rank[a] == 1:
            _arrow(ax, [(ax_, ay + half_h), (bx, by - half_h)], kind)
        elif place.slot[a] == place.slot[b]:
            # A skip over boxes in the same slot runs down their left side.
            side = ax_ - half_w - 0.09
            _arrow(ax, [(ax_ - half_w, ay), (side, ay), (side, by), (bx - half_w, by)], kind)
        else:
            _arrow(ax, [(ax_, ay + half_h), (ax_, by - half_h - geo.row * 0.25), (bx, by - half_h)], kind)


def _loss_bus(ax, place: _Placement) -> None:
    """Every reconstructor feeds a vertical orange line right of its column; the lines of
    earlier columns join along the bottom and run into ``sim_loss``."""
    view = place.view
    sims = [n for n, k in view.nodes(data="kind") if k == "sim"]
    loss = next((n for n, k in view.nodes(data="kind") if k == "loss"), None)
    if not sims or loss is None:
        return
    half_w, half_h = place.geo.box_w / 2, place.geo.box_h / 2
    bottom_y = place.bottom_y + 0.12
    line = dict(color=EDGE["loss"], linewidth=1.0, zorder=2)
    lx, ly = place.centre(loss)
    last = place.column_of(loss)
    columns = sorted({place.column_of(n) for n in sims})
    for col in columns:
        in_column = [n for n in sims if place.column_of(n) == col]
        for n in in_column:
            x, y = place.centre(n)
            ax.plot([x + half_w, place.bus_x(col)], [y, y], **line)
        if col != last:
            top = min(place.centre(n)[1] for n in in_column)
            ax.plot([place.bus_x(col), place.bus_x(col), place.bus_x(last)], [top, bottom_y, bottom_y], **line)
    feeders = [place.centre(n)[1] for n in sims if place.column_of(n) == last]
    top = min(feeders + [ly])
    low = bottom_y if any(c != last for c in columns) else max(feeders + [ly])
    ax.plot([place.bus_x(last), place.bus_x(last)], [top, low], **line)
    _arrow(ax, [(place.bus_x(last), ly), (lx + half_w, ly)], "loss")
    for target in view.successors(loss):
        tx, ty = place.centre(target)
        if abs(ty - ly) < 1e-6:
            _arrow(ax, [(lx - half_w, ly), (tx + half_w, ty)], "loss")
        else:
            _arrow(ax, [(lx, ly + half_h), (tx + half_w * 0.5, ty - half_h)], "loss")
