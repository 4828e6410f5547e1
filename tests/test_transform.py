"""simfx.transform on real (randomly initialised) torchvision models and tiny ones."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import simfx
from conftest import InlineResidualNet, PlainSequential, TinyResNet, assert_reconstructor_gradients

M = torchvision.models
IMAGE = (2, 3, 64, 64)


def _resnet_names(layers):
    return [f"layer{i}.{j}" for i, n in enumerate(layers, start=1) for j in range(n)]


# name -> (factory, example shape, expected auto-selected block names)
MODELS = {
    "resnet18": (lambda: M.resnet18(num_classes=10), IMAGE, _resnet_names([2, 2, 2, 2])),
    "resnet50": (lambda: M.resnet50(num_classes=10), IMAGE, _resnet_names([3, 4, 6, 3])),
    "mobilenet_v2": (
        lambda: M.mobilenet_v2(num_classes=10),
        IMAGE,
        [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)],
    ),
    "vgg11": (
        lambda: M.vgg11(num_classes=10),
        IMAGE,
        [f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)] + ["classifier.0", "classifier.3"],
    ),
    "densenet121": (
        lambda: M.densenet121(num_classes=10),
        IMAGE,
        ["features.conv0"]
        + [f"features.{s}{i}" for i in (1, 2, 3) for s in ("denseblock", "transition")]
        + ["features.denseblock4"],
    ),
    "swin_t": (
        lambda: M.swin_t(num_classes=10),
        IMAGE,
        [f"features.{s}.{j}" for s, n in ((1, 2), (3, 2), (5, 6), (7, 2)) for j in range(n)],
    ),
    "vit_b_16": (
        lambda: M.vit_b_16(image_size=32, num_classes=10),
        (2, 3, 32, 32),
        [f"encoder.layers.encoder_layer_{i}" for i in range(12)],
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model(name):
    factory, shape, expected = MODELS[name]
    model = factory()
    example = torch.randn(*shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    sim = simfx.transform(model, example)

    # auto picks exactly the expected blocks, in graph order
    assert [b.name for b in sim.sim_blocks] == expected
    # transform touched no buffer (BatchNorm statistics included) and no parameter
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # original names unchanged; reconstructors live under one namespace
    keys = set(sim.state_dict())
    assert set(before) <= keys
    assert all(k.startswith("simfx.") for k in keys - set(before))

    # training: finite positive loss, gradients to every block and every reconstructor parameter
    sim.train()
    batch = torch.randn(*shape)
    captured = {}
    first = sim.sim_blocks[1].key  # a block whose input carries gradient
    handle = sim.simfx[first].register_forward_pre_hook(lambda m, args: captured.update(x=args[0], y=args[1]))
    out, sim_loss = sim(batch)
    handle.remove()
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(sim_loss) and sim_loss > 0
    sim_loss.backward(retain_graph=True)
    for block in sim.sim_blocks:
        module = sim.get_submodule(block.boundary.module_name) if block.boundary.module_name else None
        if module is not None and any(p.requires_grad for p in module.parameters()):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), block.name
    assert_reconstructor_gradients(sim.simfx.named_parameters())

    # none through the target side: the block loss reaches x only through y
    block_loss = sim.simfx[first](captured["x"], captured["y"])
    via_loss = torch.autograd.grad(block_loss, captured["x"], retain_graph=True)[0]
    d_y = torch.autograd.grad(block_loss, captured["y"], retain_graph=True)[0]
    via_y = torch.autograd.grad(captured["y"], captured["x"], grad_outputs=d_y, retain_graph=True)[0]
    torch.testing.assert_close(via_loss, via_y)

    # eval: bit-identical output, zero loss
    sim.eval()
    model.eval()
    with torch.no_grad():
        got, zero = sim(example)
        want = model(example)
    assert torch.equal(got, want)
    assert zero.item() == 0.0 and zero.dtype == torch.float32


def test_inline_functional_residuals_are_found():
    model = InlineResidualNet()
    x = torch.randn(2, 6, 8)
    sim = simfx.transform(model, x)
    blocks = sim.sim_blocks
    assert len(blocks) == 3
    assert all(b.boundary.kind == "residual" and b.boundary.module_type is None for b in blocks)
    assert [b.boundary.in_layout for b in blocks] == ["BNC"] * 3
    out, loss = sim(x)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for mlp in model.mlps:
        assert mlp[0].weight.grad is not None
    sim.eval()
    assert torch.equal(sim(x)[0], model.eval()(x))


def test_strided_and_channel_changing_blocks_train(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    sim = simfx.transform(tiny_resnet, x)
    shapes = [(b.boundary.in_shape, b.boundary.out_shape) for b in sim.sim_blocks]
    assert shapes == [((2, 8, 16, 16), (2, 8, 16, 16)), ((2, 8, 16, 16), (2, 16, 8, 8)), ((2, 16, 8, 8), (2, 16, 8, 8))]
    head = sim.simfx["blocks_1"].objective
    assert head.pre_proj.weight.shape == (8, 16)
    out, loss = sim(torch.randn(3, 3, 24, 24))  # other batch and resolution than the example
    assert torch.isfinite(loss)
    loss.backward()


def test_sequential_fallback_when_no_residual():
    model = PlainSequential()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8))
    # the last conv produces... not the model output (the head does), so it is kept
    assert [b.name for b in sim.sim_blocks] == ["features.0", "features.2", "features.4"]


def test_block_producing_the_output_is_never_auto_selected():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    sim = simfx.transform(model, torch.randn(3, 4))
    assert [b.name for b in sim.sim_blocks] == ["0", "2"]
    decisions = sim.simfx_info.plan.decisions
    assert decisions["3"] == "produces the model's output"


def test_per_block_losses_are_returned_by_name(tiny_resnet):
    sim = simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16), per_block=True)
    out, total, per_block = sim(torch.randn(2, 3, 16, 16))
    assert list(per_block) == ["blocks.0", "blocks.1", "blocks.2"]
    torch.testing.assert_close(total, 5e-3 * torch.stack(list(per_block.values())).mean())
    sim.eval()
    out, zero, per_block = sim(torch.randn(2, 3, 16, 16))
    assert all(v.item() == 0.0 for v in per_block.values())


def test_options_reach_the_reconstructors(tiny_resnet):
    sim = simfx.transform(
        tiny_resnet, torch.randn(2, 3, 16, 16), dim=32, channel_ratio=0.5, token_ratio=0.5,
        token_sampling="per_sample", loss="cos", beta=0.1,
        overrides={"blocks.2": {"objective": "activation_l2"}},
    )
    heads = sim.simfx
    assert heads["blocks_0"].objective.predictor.weight.shape == (32, 32)
    assert heads["blocks_0"].in_channels == 4 and heads["blocks_1"].out_channels == 8
    assert heads["blocks_0"].token_sampling == "per_sample" and heads["blocks_0"].objective.loss == "cos"
    assert type(heads["blocks_2"].objective).__name__ == "ActivationL2"
    assert [b.options.beta for b in sim.sim_blocks] == [0.1] * 3


def test_transform_is_deterministic_under_a_seed(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    a = simfx.transform(tiny_resnet, x, copy=True)
    torch.manual_seed(1)
    b = simfx.transform(tiny_resnet, x, copy=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    torch.manual_seed(2)
    la = a(x)[1]
    torch.manual_seed(2)
    lb = b(x)[1]
    assert torch.equal(la, lb)


def test_shares_submodules_with_the_model_unless_copy(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    shared = simfx.transform(tiny_resnet, x)
    assert shared.blocks[0] is tiny_resnet.blocks[0]
    copied = simfx.transform(tiny_resnet, x, copy=True)
    assert copied.blocks[0] is not tiny_resnet.blocks[0]
    with torch.no_grad():
        shared.stem.weight.add_(1.0)
    assert torch.equal(tiny_resnet.stem.weight, shared.stem.weight)


def test_train_mode_output_matches_the_model_when_nothing_is_random(tiny_resnet):
    x = torch.randn(2, 3, 16, 16)
    sim = simfx.transform(tiny_resnet, x).train()
    assert torch.equal(sim(x)[0], tiny_resnet(x))


def test_eval_runs_the_model_itself_and_training_keeps_its_traced_mode():
    """fx bakes self.training into graphs: eval never runs the traced graph, it calls the model."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            x = x + self.block(x)
            return self.head(nn.functional.dropout(x, 0.9, self.training))

    model = Net()
    sim = simfx.transform(model, torch.randn(4, 6))
    sim.eval()
    model.eval()
    x = torch.randn(4, 6)
    assert torch.equal(sim(x)[0], model(x))
    assert "training = True" in sim.code and not hasattr(sim, "eval_code")
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(module))
    sim(x)
    assert calls == [model]  # eval mode is the model's own call, hooks included


def test_model_with_tuple_output_returns_it_unchanged():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            h = self.body(x)
            return h, {"sum": h.sum(dim=1)}

    model = Net()
    sim = simfx.transform(model, torch.randn(3, 4), blocks=["body.0"])
    (h, extra), loss = sim(torch.randn(3, 4))
    assert h.shape == (3, 4) and extra["sum"].shape == (3,)
