"""The analysis and emit stages alone, each fed a record made by hand.

* analysis: a graph built node by node with ``torch.fx.Graph`` (no model to trace)
  wrapped in a hand-made :class:`TracedModel`; the shape pass and the boundaries
  stage find its shapes, channel axes and residual region.
* emit: a :class:`Plan` written by hand (key, channel axes, widths); the rewrite
  follows it to the letter and decides nothing itself.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import simfx
from simfx.analysis.boundaries import find_candidates
from simfx.analysis.shapes import propagate_shapes
from simfx.capture.fx_trace import trace_model
from simfx.capture.inputs import CallTemplate, ExampleInputs
from simfx.capture.record import TracedModel
from simfx.emit.rewrite import plain_graph, rewrite
from simfx.plan.select import Plan, PlannedBlock


def _hand_built_residual() -> TracedModel:
    """``y = x + linear2(relu(linear1(x)))`` then ``head(y)``, as graph nodes written one by one."""
    root = nn.Module()
    root.linear1, root.linear2, root.head = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 3)
    graph = fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_module("linear1", (x,))
    h = graph.call_function(F.relu, (h,))
    h = graph.call_module("linear2", (h,))
    y = graph.call_function(operator.add, (x, h))
    graph.output(graph.call_module("head", (y,)))
    return TracedModel(root=root, model=root, graph=graph, call=CallTemplate.plain(("x",)),
                       inputs=(torch.randn(4, 5, 6),))


def test_analysis_finds_shapes_axes_and_the_residual_region_of_a_hand_built_graph():
    traced = _hand_built_residual()
    shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
    assert shapes.metas["linear1"].shape == (4, 5, 12) and shapes.metas["linear1"].channel_dim == 2
    assert shapes.metas["add"].shape == (4, 5, 6)
    region, = [b for b in find_candidates(traced, shapes) if b.kind == "residual"]
    assert (region.entry, region.exit, region.residual, region.eligible) == ("x", "add", True, True)
    assert region.nodes == ("linear1", "relu", "linear2", "add")
    assert (region.in_channel_dim, region.out_channel_dim, region.weight_layers) == (2, 2, 2)
    assert region.in_layout == region.out_layout == "BNC"


def test_the_shape_pass_runs_no_kernel_and_leaves_buffers_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace_model(model, ExampleInputs((torch.randn(2, 3, 8, 8),)))
    shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
    assert shapes.metas["_1"].shape == (2, 4, 6, 6) and shapes.metas["_1"].channel_dim == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def _traced_and_candidates(model, x):
    traced = trace_model(model, ExampleInputs((x,)))
    shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
    return traced, {b.name: b for b in find_candidates(traced, shapes)}


def test_rewrite_follows_a_hand_written_plan_to_the_letter():
    torch.manual_seed(0)
    model, x = TwoBlocks(), torch.randn(2, 3, 16, 16)
    traced, candidates = _traced_and_candidates(model, x)
    # Only block2, under a key of our choosing, reading 5 of its 8 input and 7 of its 16 output channels.
    options = simfx.SimOptions(dim=16)
    block = PlannedBlock(candidates["block2"], options, "my_key", 1, 1, 5, 7)
    sim = rewrite(traced, Plan((block,), {"block2": "selected by hand"}))

    head = sim.get_submodule("simfx.my_key")
    assert (head.in_channels, head.out_channels, head.in_channel_dim, head.out_channel_dim) == (5, 7, 1, 1)
    assert head.objective.pre_proj.weight.shape == (5, 7)  # C_out -> C_in, the plan's widths
    assert list(dict(sim.named_children())) == ["stem", "block1", "block2", "head", "simfx"]
    assert sim.simfx_info.plan.decisions == {"block2": "selected by hand"}

    loss_node = next(n for n in sim.graph.nodes if n.op == "call_module" and n.target == "simfx.my_key")
    x_node, y_node = loss_node.args
    # The planned block runs as one call of its module; block1, not planned, stays traced through.
    assert (x_node.target, y_node.target) == ("block1.1", "block2")
    assert loss_node.prev is y_node  # read while y is fresh
    assert sim.simfx_info.nodes["block2"] == (x_node.name, y_node.name, loss_node.name)

    out, sim_loss = sim(x)
    assert sim_loss.shape == () and torch.isfinite(sim_loss) and sim_loss > 0
    # Without the inserted nodes the graph is the model's own computation.
    plain = fx.GraphModule(sim, plain_graph(sim))
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_rewrite_refuses_a_model_that_already_has_a_simfx_submodule():
    model, x = TwoBlocks(), torch.randn(2, 3, 16, 16)
    model.simfx = nn.Identity()
    traced, candidates = _traced_and_candidates(model, x)
    block = PlannedBlock(candidates["block1"], simfx.SimOptions(), "block1", 1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"submodule named 'simfx'"):
        rewrite(traced, Plan((block,), {}))
