"""to_networkx, graph_diff and draw on small models."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

import simfx
from conftest import InlineResidualNet, TinyResNet

IMAGE = (2, 3, 16, 16)


@pytest.fixture(scope="module")
def sim():
    torch.manual_seed(0)
    return simfx.transform(TinyResNet(), torch.randn(*IMAGE))


@pytest.fixture(scope="module")
def inline_sim():
    torch.manual_seed(0)
    return simfx.transform(InlineResidualNet(), torch.randn(2, 10, 8))


def test_networkx_graph_has_every_node_with_attributes(sim):
    g = simfx.to_networkx(sim)
    assert list(g.nodes) == [n.name for n in sim.graph.nodes]
    for node in sim.graph.nodes:
        attrs = g.nodes[node.name]
        assert attrs["op"] == node.op
        assert attrs["inserted"] == (node.name in sim.simfx_info.inserted)
        assert set(attrs) >= {"target", "shape", "boundary", "module", "scope", "order"}
        for source in node.all_input_nodes:
            assert g.has_edge(source.name, node.name)
    assert g.nodes["x"]["shape"] == IMAGE
    assert g.nodes["stem"]["shape"] == (2, 8, 16, 16) and g.nodes["stem"]["boundary"] is None
    for block in sim.sim_blocks:
        members = {n for n, b in g.nodes(data="boundary") if b == block.name and not g.nodes[n]["inserted"]}
        x, y, loss = sim.simfx_info.nodes[block.name]
        assert y in members and g.nodes[loss]["boundary"] == block.name and g.has_edge(x, loss)
        if block.name in sim.simfx_info.calls:  # the block runs as one call of its module
            assert members == {y} and g.nodes[y]["op"] == "call_module"
    assert g.graph["boundaries"] == [b.name for b in sim.sim_blocks]


def test_diff_lists_exactly_the_inserted_nodes(sim):
    diff = simfx.graph_diff(sim)
    inserted = [n.name for n in sim.graph.nodes if n.name in sim.simfx_info.inserted]
    assert list(diff.added_nodes) == inserted and len(inserted) == len(sim.sim_blocks) + 1
    assert diff.removed_edges == ()
    assert all(a in inserted or b in inserted for a, b in diff.added_edges)
    # each reconstructor reads its block's x and y; each loss feeds the aggregate, which feeds the output
    assert len(diff.added_edges) == 3 * len(sim.sim_blocks) + 1
    for block in sim.sim_blocks:
        x, y, key = sim.simfx_info.nodes[block.name]
        assert sim.graph.find_nodes(op="call_module", target=f"simfx.{block.key}")[0].name == key
        assert (x, key) in diff.added_edges and (y, key) in diff.added_edges
    assert "nodes added" in str(diff)


def _svg(path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    ids = {e.get("id") for e in root.iter() if e.get("id")}
    text = " ".join(t for e in root.iter() for t in [e.text] if t)
    return ids, text, path.read_text()


@pytest.mark.parametrize("full", [False, True], ids=["collapsed", "full"])
def test_matplotlib_svg_has_block_clusters_and_reconstructors(sim, tmp_path, full):
    pytest.importorskip("matplotlib")
    out = simfx.draw(sim, tmp_path / "g.svg", full=full, engine="matplotlib")
    ids, text, raw = _svg(out)
    for block in sim.sim_blocks:
        assert f"cluster_{block.name}" in ids
        assert f"box_sim:{block.name}" in ids
        assert block.name in text
    assert "box_sim_loss" in ids
    assert "#fbd38d" in raw  # reconstructor fill colour
    if full:
        assert "box_blocks_0" in ids  # one box per node: the block is one call of its module
    else:
        assert f"box_block:{sim.sim_blocks[0].name}" in ids and "box_blocks_0" not in ids


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_dot_svg_has_block_clusters(sim, tmp_path):
    ids, text, _ = _svg(simfx.draw(sim, tmp_path / "g.svg", engine="dot"))
    for block in sim.sim_blocks:
        assert f"cluster_{block.name}" in ids and f"box_sim:{block.name}" in ids


def test_dot_source_of_inline_residuals_and_bad_arguments(inline_sim, tmp_path):
    dot = simfx.draw(inline_sim, tmp_path / "g.dot").read_text()  # the DOT source needs no graphviz
    assert dot.count("subgraph cluster_") == len(inline_sim.sim_blocks)
    with pytest.raises(ValueError, match=r"\.svg"):
        simfx.draw(inline_sim, tmp_path / "g.pdf")
    with pytest.raises(TypeError):
        simfx.draw(InlineResidualNet(), tmp_path / "g.svg")


def test_matplotlib_png_of_inline_residuals(inline_sim, tmp_path):
    pytest.importorskip("matplotlib")
    png = simfx.draw(inline_sim, tmp_path / "g.png", engine="matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
