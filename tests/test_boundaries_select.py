"""Candidate boundaries (module scopes, residual regions) and the selection stage."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import simfx
from simfx.analysis.boundaries import find_candidates
from simfx.capture.inputs import ExampleInputs
from simfx.analysis.shapes import propagate_shapes
from simfx.capture.fx_trace import trace_model
from conftest import ConvBlock, InlineResidualNet, TinyResNet


def candidates(model, *inputs):
    traced = trace_model(model, ExampleInputs(inputs))
    shapes = propagate_shapes(traced.graph, traced.root, traced.inputs)
    return {b.name: b for b in find_candidates(traced, shapes)}


def test_module_scope_records(tiny_resnet):
    found = candidates(tiny_resnet, torch.randn(2, 3, 16, 16))
    block = found["blocks.1"]
    assert block.kind == "module" and block.module_type is ConvBlock
    assert block.residual and block.has_weight and block.container_child and block.eligible
    assert block.in_shape == (2, 8, 16, 16) and block.out_shape == (2, 16, 8, 8)
    assert block.in_layout == block.out_layout == "NCHW"
    assert block.out_tokens == 64
    assert not found["blocks"].residual  # the Sequential's exit is its last block's add, not its own
    assert found["fc"].produces_output
    assert not found["blocks.1.conv1"].residual


def test_residual_region_without_module_is_named_after_scope_and_add(inline_net):
    found = candidates(inline_net, torch.randn(2, 5, 8))
    regions = [b for b in found.values() if b.kind == "residual"]
    assert [b.name for b in regions] == ["mlps.0.residual", "mlps.1.residual", "mlps.2.residual"]
    first = regions[0]
    assert first.entry == "stem" and first.exit == "add"
    assert set(first.nodes) >= {"norms_0", "mlps_0_0", "mlps_0_1", "mlps_0_2", "add"}


def test_nested_residuals_pick_the_innermost_module_and_skip_regions_inside_it():
    class Transformerish(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(8), nn.LayerNorm(8)
            self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = x + self.f1(self.n1(x))
            return x + self.f2(self.n2(x))

    class LongSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(Transformerish(), Transformerish())

        def forward(self, x):
            return x + self.inner(x)

    model = nn.Sequential(nn.Linear(4, 8), LongSkip(), nn.Linear(8, 2))
    table = simfx.find_boundaries(model, torch.randn(2, 3, 4))
    rows = {r.name: r for r in table}
    assert [r.name for r in table.selected()] == ["1.inner.0", "1.inner.1"]
    assert rows["1"].decision.startswith("contains residual block '1.inner.0'")
    inner_regions = [r for r in table if r.boundary.kind == "residual"]
    assert inner_regions and all(r.decision.startswith("inside residual block") for r in inner_regions)


def test_post_norm_exit_still_counts_as_residual():
    class PostNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(x + self.f(x))

    model = nn.Sequential(nn.Linear(3, 6), PostNorm(), PostNorm(), nn.Linear(6, 1))
    sim = simfx.transform(model, torch.randn(4, 3))
    assert [b.name for b in sim.sim_blocks] == ["1", "2"]


def test_repeated_module_calls_are_separate_boundaries():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ConvBlock(4, 4)
            self.stem = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.block(self.block(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    model = Shared()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8))
    assert [b.name for b in sim.sim_blocks] == ["block", "block@1"]
    assert list(sim.simfx) == ["block", "block_1"]
    only_second = simfx.transform(model, torch.randn(2, 3, 8, 8), blocks=["block@1"])
    assert [b.name for b in only_second.sim_blocks] == ["block@1"]
    both_by_name = simfx.transform(model, torch.randn(2, 3, 8, 8), blocks=["block"])
    assert len(both_by_name.sim_blocks) == 2


def test_ineligible_reasons():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.pair = nn.Linear(4, 4)
            self.relu = nn.ReLU(inplace=True)
            self.head = nn.Linear(4, 2)

        def forward(self, tokens):
            h = self.embed(tokens)  # (B, N, 4) from an int input
            h = self.relu(self.pair(h))
            return self.head(h.transpose(0, 1).mean(0))

    found = candidates(Net(), torch.randint(0, 10, (2, 5)))
    assert found["embed"].reason == "input is torch.int64, not floating point"
    assert found["relu"].reason == "modifies its input 'pair' in place (relu), so SIM would read the changed value"
    assert found["pair"].eligible


def test_selectors_by_class_glob_regex_predicate_and_auto_union(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    by = lambda **kw: [b.name for b in simfx.transform(tiny_resnet, x, **kw).sim_blocks]  # noqa: E731
    assert by(blocks=[ConvBlock]) == ["blocks.0", "blocks.1", "blocks.2"]
    assert by(blocks="blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert by(blocks="blocks.*.conv*") == [f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)]
    assert by(blocks=re.compile(r"blocks\.[02]")) == ["blocks.0", "blocks.2"]
    assert by(blocks=lambda b: b.out_shape is not None and b.out_shape[1] == 16 and b.residual) == ["blocks.1", "blocks.2"]
    assert by(blocks=["auto", nn.Linear], exclude=["blocks.1"]) == ["blocks.0", "blocks.2", "fc"]
    assert by(blocks="**.bn2") == ["blocks.0.bn2", "blocks.1.bn2", "blocks.2.bn2"]


def test_find_boundaries_is_a_printable_preview(tiny_resnet):
    table = simfx.find_boundaries(tiny_resnet, torch.randn(2, 3, 16, 16), blocks=[ConvBlock], exclude="blocks.2")
    text = str(table)
    assert text.splitlines()[0].split()[:4] == ["name", "type", "in", "out"]
    assert re.search(r"blocks\.1\s+ConvBlock\s+2x8x16x16\s+2x16x8x8\s+NCHW->NCHW\s+yes\s+yes\s+selected by ConvBlock", text)
    assert "excluded by 'blocks.2'" in text
    assert text.endswith(f"2 of {len(table)} candidates selected (frontend: fx)")
    assert table.frontend == "fx" and table.opaque == {}


def test_find_boundaries_reports_when_nothing_is_eligible():
    table = simfx.find_boundaries(nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 4))
    assert table.selected() == []
    assert {r.name: r.decision for r in table}["1"] == "produces the model's output"


def test_too_few_tokens_auto_skips_and_explicit_warns():
    model = TinyResNet()
    x = torch.randn(2, 3, 2, 2)  # blocks.1 and blocks.2 run at 1x1: one token
    sim = simfx.transform(model, x)
    assert [b.name for b in sim.sim_blocks] == ["blocks.0"]
    assert sim.simfx_info.plan.decisions["blocks.2"] == "1 output token(s) at the example input; rho_sim needs 2"
    with pytest.warns(UserWarning, match="block 'blocks.2' has 1 output token"):
        simfx.transform(model, x, blocks=["blocks.2"])
    # losses without the token-standardisation work on a single token
    sim = simfx.transform(model, x, loss="mse")
    assert len(sim.sim_blocks) == 3
