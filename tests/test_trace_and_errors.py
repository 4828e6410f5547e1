"""Tracing (both modes, registries, GraphModule input) and the errors users see."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
from torch import nn

import simfx
from simfx.capture.fx_trace import trace_model
from conftest import TinyResNet


class DataDependentBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.linear(x)
        return -self.linear(x)


class UsesDataDependentBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.block = DataDependentBlock()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


def test_untraceable_block_error_names_module_and_fix():
    with pytest.raises(simfx.TraceError) as info:
        simfx.transform(UsesDataDependentBlock(), torch.randn(2, 4), frontend="fx", auto_opaque=False)
    message = str(info.value)
    assert "inside module 'block'" in message
    assert "DataDependentBlock" in message
    assert "leaf_modules=[DataDependentBlock]" in message
    assert "test_trace_and_errors.py" in message  # points at the user's line
    assert info.value.module_name == "block" and info.value.module_type is DataDependentBlock


def test_untraceable_block_kept_opaque_still_gets_sim():
    model = UsesDataDependentBlock()
    sim = simfx.transform(model, torch.randn(2, 4), leaf_modules=[DataDependentBlock], blocks=[DataDependentBlock])
    (block,) = sim.sim_blocks
    assert block.name == "block" and block.boundary.opaque
    out, loss = sim(torch.randn(2, 4))
    loss.backward()
    assert model.block.linear.weight.grad is not None
    sim.eval()
    x = torch.randn(2, 4)
    assert torch.equal(sim(x)[0], model.eval()(x))


def test_leaf_module_by_qualified_name_and_registry():
    model = UsesDataDependentBlock()
    traced = trace_model(model, leaf_modules=["block"])
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["inp", "block", "out"]
    assert traced.opaque == {"block": "listed in leaf_modules"}

    simfx.register_leaf_module(DataDependentBlock)
    try:
        traced = trace_model(UsesDataDependentBlock())
        assert "block" in traced.opaque
    finally:
        simfx.LEAF_MODULES.unregister(DataDependentBlock)
    with simfx.LEAF_MODULES.registered(DataDependentBlock):
        assert "block" in trace_model(UsesDataDependentBlock()).opaque
    assert DataDependentBlock not in simfx.LEAF_MODULES
    with pytest.raises(ValueError, match=r"leaf_modules names \['nope'\] are not submodules"):
        trace_model(model, leaf_modules=["nope"])


def clamp_rows(x):
    return x if x.shape[0] > 1 and bool(x.sum() > 0) else x * 2  # untraceable helper


class UsesHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(clamp_rows(self.a(x)))


def test_root_forward_failure_suggests_autowrap_and_autowrap_works():
    with pytest.raises(simfx.TraceError) as info:
        simfx.transform(UsesHelper(), torch.randn(2, 4), frontend="fx")
    message = str(info.value)
    assert message.startswith("simfx could not trace UsesHelper.forward at test_trace_and_errors.py:")
    assert "Fix: autowrap_functions=[clamp_rows] records each call to clamp_rows()" in message
    sim = simfx.transform(UsesHelper(), torch.randn(2, 4), autowrap_functions=[clamp_rows], blocks=["a"])
    assert any(n.target is clamp_rows for n in sim.graph.nodes)
    # With defaults, neither fx nor torch.export takes the forward: SIM reads the blocks at their module calls.
    assert simfx.transform(UsesHelper(), torch.randn(2, 4), blocks=["a"]).simfx_info.frontend == "calls"


def test_tracing_does_not_modify_the_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x) + torch.tensor([1.0, 2.0, 3.0]))

    model = WithConstant().train()
    model.b.eval()  # a mixed mode survives the two traces
    attrs = set(vars(model))
    sim = simfx.transform(model, torch.randn(2, 3), blocks=["a"])
    assert set(vars(model)) == attrs  # fx's tensor constant landed on a copy
    assert model.training and not model.b.training
    assert "_tensor_constant0" not in sim.state_dict()  # constants are not model state
    sim.eval()
    x = torch.randn(2, 3)
    assert torch.equal(sim(x)[0], model.eval()(x))


def test_graph_module_is_accepted_as_is(tiny_resnet):
    gm = fx.symbolic_trace(tiny_resnet)
    sim = simfx.transform(gm, torch.randn(2, 3, 16, 16))
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    sim.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(sim(x)[0], tiny_resnet.eval()(x))


def test_stripped_module_transforms_again(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    plain = simfx.strip(simfx.transform(tiny_resnet, x))
    again = simfx.transform(plain, x, token_ratio=0.5)
    assert [b.name for b in again.sim_blocks] == ["blocks.0", "blocks.1", "blocks.2"]


def test_missing_example_inputs():
    with pytest.raises(simfx.ExampleInputsError, match=r"needs example_inputs for TinyResNet.*torch\.randn"):
        simfx.transform(TinyResNet())
    with pytest.raises(simfx.ExampleInputsError, match="holds no tensor"):
        simfx.transform(TinyResNet(), (1, 2))
    with pytest.raises(simfx.ExampleInputsError, match="must be a tensor, a tuple .* or a dict"):
        simfx.transform(TinyResNet(), "images")
    with pytest.raises(TypeError, match=r"example_inputs do not fit TinyResNet.forward\(x\): .*'images'"):
        simfx.transform(TinyResNet(), {"images": torch.randn(2, 3, 8, 8)})


def test_selector_matching_nothing_lists_names(tiny_resnet):
    with pytest.raises(simfx.SelectorError) as info:
        simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16), blocks=["layer*.*"])
    message = str(info.value)
    assert "blocks selector 'layer*.*' matched no block" in message
    assert "blocks.0" in message and "find_boundaries" in message
    with pytest.raises(simfx.SelectorError, match="exclude selector 'nope' matched no block"):
        simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16), exclude="nope")
    with pytest.raises(simfx.SelectorError, match=r"overrides selector 'stem' matched none of the selected blocks"):
        simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16), overrides={"stem": {"dim": 8}})


def test_selector_matching_only_ineligible_blocks_says_why():
    class TwoInputs(nn.Module):
        def forward(self, a, b):
            torch.relu_(a)
            return a + b

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.join = TwoInputs()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.join(self.pre(x), x))

    with pytest.raises(simfx.SelectorError, match=r"matched only blocks that cannot take SIM: 'join': modifies its input 'pre' in place"):
        simfx.transform(Net(), torch.randn(3, 4), blocks=["join"])


def test_no_eligible_block_explains_each_candidate():
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(simfx.NoEligibleBlockError) as info:
        simfx.transform(model, torch.randn(3, 4))
    message = str(info.value)
    assert "auto found no residual block" in message
    assert re.search(r"1 \(Linear\): produces the model's output", message)
    assert re.search(r"0 \(ReLU\): not a weighted child", message)


def test_already_transformed_and_bad_arguments(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    sim = simfx.transform(tiny_resnet, x)
    with pytest.raises(TypeError, match=r"already transformed.*simfx\.strip"):
        simfx.transform(sim, x)
    with pytest.raises(TypeError, match="simfx expects a torch.nn.Module"):
        simfx.transform(lambda t: t, x)
    with pytest.raises(TypeError, match="a selector must be a module class"):
        simfx.transform(tiny_resnet, x, blocks=[3])
    with pytest.raises(TypeError, match="strip expects a module returned by simfx.transform"):
        simfx.strip(tiny_resnet)
    with pytest.raises(ValueError, match=r"channel_dim=5 for the input of block 'blocks.0'"):
        simfx.transform(tiny_resnet, x, channel_dim=5)


@fx.wrap
def _window_fitting(window: list, size: list) -> list:
    # Mutates its list argument, as torchvision's Swin3d window helper does.
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


class _WindowedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        window = _window_fitting([8, 8], [x.shape[2], x.shape[3]])
        pooled = nn.functional.avg_pool2d(x, kernel_size=(window[0], window[1]), stride=1, padding=0)
        return self.conv(x) + x + pooled.mean()


def test_wrapped_function_mutating_its_list_argument_transforms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _WindowedResidual(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    sim = simfx.transform(model, x)
    assert "1" in [b.name for b in sim.simfx_info.plan.blocks]
    sim.eval()
    model.eval()
    assert torch.equal(sim(x)[0], model(x))
