"""The graphviz engine of :func:`simfx.draw`: DOT source for a view, rendered by ``dot``."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import networkx as nx

from .view import CLUSTER, COLOURS, EDGE

__all__ = ["to_dot", "render_with_dot"]


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


def render_with_dot(dot: str, source: str, path: Path, fmt: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".dot", delete=False) as f:
        f.write(source)
    try:
        subprocess.run([dot, f"-T{fmt}", "-o", str(path), f.name], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"graphviz dot failed: {error.stderr.strip().splitlines()[-1:]}; "
                           f"use engine='matplotlib'.") from None
    finally:
        os.unlink(f.name)
