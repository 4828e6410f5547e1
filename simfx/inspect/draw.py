"""Inspect stage — :func:`draw`: a picture of the rewritten training graph.

What is drawn (collapsed or full view, reconstructors beside their blocks, the
loss bus) is :mod:`simfx.inspect.view`. Rendering uses graphviz's ``dot`` when it
is installed (:mod:`simfx.inspect.dot`) and otherwise a built-in layered layout
drawn with matplotlib (:mod:`simfx.inspect.layered`); both write SVG (or PNG, or
the DOT source, by the file's suffix).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..runtime.module import SimGraphModule
from .dot import render_with_dot, to_dot
from .layered import draw_layered
from .view import build_view, default_title

__all__ = ["draw"]


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
    title = title or default_title(view, full)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".dot":
        path.write_text(to_dot(view, title))
    elif dot is not None and engine in ("auto", "dot"):
        render_with_dot(dot, to_dot(view, title), path, suffix[1:])
    else:
        draw_layered(view, path, title, full)
    return path
