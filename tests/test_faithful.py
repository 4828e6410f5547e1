"""SIM is the only change: ordinary PyTorch code keeps its behaviour after simfx.transform, or is refused.

Each test writes a model the way people write them (frozen parts under no_grad,
fp32 heads under autocast, hooks, checkpointing, stochastic depth, LayerDrop,
in-place residuals, wrapper modules) and checks the transformed module against
the model itself: outputs, gradients, hooks firing, memory, modes. Where simfx
cannot keep a behaviour, the test checks the error names the place and the fix.
"""

from __future__ import annotations

import copy
import types
import warnings

import numpy as np
from numpy.random import uniform as imported_uniform
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

import simfx
from simfx.emit.rewrite import plain_graph
from conftest import ConvBlock, StopGradient


def _outputs_match(a, b):
    leaves_a, leaves_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert type(x) is type(y)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)


def _train_output(module, *inputs, seed=0):
    torch.manual_seed(seed)
    return module(*inputs)


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


# --- grad mode -------------------------------------------------------------------------


class FrozenBackbone(nn.Module):
    """A frozen feature extractor under no_grad, a trained head on top (linear probing)."""

    def __init__(self, use_set_grad_enabled: bool = False):
        super().__init__()
        self.use_set_grad_enabled = use_set_grad_enabled
        self.stem = nn.Linear(8, 16)
        self.backbone = nn.Sequential(Residual(16), Residual(16))
        self.head = nn.Sequential(Residual(16), Residual(16), nn.Linear(16, 3))

    def forward(self, x):
        if self.use_set_grad_enabled:
            torch.set_grad_enabled(False)
            features = self.backbone(self.stem(x))
            torch.set_grad_enabled(True)
        else:
            with torch.no_grad():
                features = self.backbone(self.stem(x))
        return self.head(features)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("style", ["no_grad", "set_grad_enabled"])
def test_a_frozen_part_under_no_grad_gets_no_gradient(frontend, style):
    model = FrozenBackbone(use_set_grad_enabled=style == "set_grad_enabled")
    x = torch.randn(4, 5, 8)
    sim = simfx.transform(model, x, frontend=frontend)
    assert sim.simfx_info.check == "passed"
    names = [b.name for b in sim.sim_blocks]
    assert names and all(n.startswith("head.") for n in names)  # blocks under no_grad cannot train
    if frontend == "fx":  # export keeps the region as one wrap_with_set_grad_enabled call
        assert "torch.no_grad()" in sim.simfx_info.plan.decisions["backbone.0"]
    out, loss = sim(x)
    assert torch.equal(out, model(x))
    (out.square().mean() + loss).backward()
    assert all(p.grad is None for p in [*model.backbone.parameters(), *model.stem.parameters()])
    assert all(p.grad is not None for p in model.head.parameters())
    with torch.no_grad():
        out, loss = sim(x)
        own = model(x)
    if frontend == "export":  # the model trains itself: its own grad-mode switches run, as without simfx
        assert out.requires_grad == own.requires_grad
    else:  # the caller's no_grad survives the traced region
        assert not out.requires_grad and not loss.requires_grad
    assert torch.is_grad_enabled()


# --- autocast --------------------------------------------------------------------------


class MixedPrecisionNet(nn.Module):
    """Runs under the caller's bf16 autocast, with a head kept in float32."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(3, 8), ConvBlock(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        features = self.blocks(x).mean(dim=(2, 3))
        with torch.autocast("cpu", enabled=False):
            return self.head(features.float())


def test_an_autocast_region_of_the_model_is_kept_under_the_callers_autocast():
    model = MixedPrecisionNet()
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x, frontend="fx")
    assert "_enter_autocast" in sim.code
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = _train_output(sim, x)
        expected = _train_output(model, x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert loss.dtype == torch.float32
    sim.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out, _ = sim(x)
        assert out.dtype == torch.float32 and torch.equal(out, model(x))


# --- hooks -------------------------------------------------------------------------------


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.layer1 = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 8))
        self.layer2 = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


def test_hooks_registered_before_transform_fire_with_real_tensors_only():
    model = Stage()
    seen = []

    def capture(name):
        def hook(module, args, output):
            seen.append((name, type(output)))
        return hook

    model.layer1[0].register_forward_hook(capture("block"))
    model.layer2.register_forward_hook(capture("stage"))  # a container whose blocks would be traced through
    model.register_forward_pre_hook(lambda module, args: seen.append(("root-pre", type(args[0]))))
    model.register_forward_hook(capture("root"))
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x)
    assert seen == []  # nothing of the user's ran during the transform: no Proxy, no fake tensor
    assert "layer2" in sim.simfx_info.opaque and "layer1.0" in [b.name for b in sim.sim_blocks]
    out, loss = sim(x)
    assert seen == [("root-pre", torch.Tensor), ("block", torch.Tensor), ("stage", torch.Tensor),
                    ("root", torch.Tensor)]
    seen.clear()
    sim.eval()
    sim(x)
    assert [name for name, _ in seen] == ["root-pre", "block", "stage", "root"]


def test_hooks_that_change_outputs_change_them_in_the_transformed_module_too():
    model = Stage()
    model.layer1[1].register_forward_hook(lambda module, args, output: output * 0.5)
    model.register_forward_hook(lambda module, args, output: output + 1.0)
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x)
    out, _ = sim(x)
    assert torch.equal(out, model(x))


def test_hooks_registered_after_transform_fire_on_blocks_and_the_model_and_are_refused_on_traced_code():
    model = Stage()
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x)
    fired = []
    handles = [
        model.layer1[0].register_forward_hook(lambda m, a, o: fired.append("block")),
        model.register_forward_pre_hook(lambda m, a: fired.append("root-pre")),
    ]
    sim(x)
    assert fired == ["root-pre", "block"]
    for handle in handles:
        handle.remove()
    traced_through = model.layer2.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(simfx.FaithfulnessError, match=r"module 'layer2' has hooks, registered after simfx\.transform.*leaf_modules=\['layer2'\]"):
        sim(x)
    traced_through.remove()
    sim(x)


# --- activation checkpointing ------------------------------------------------------------


class CheckpointedBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(6)])

    def forward(self, x):
        return x + checkpoint(self.layers, x, use_reentrant=False)


class CheckpointedNet(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.Sequential(CheckpointedBlock(width), CheckpointedBlock(width))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_checkpointing_inside_a_block_still_saves_only_what_the_model_saves():
    model = CheckpointedNet()
    x = torch.randn(8, 32, 8)
    sim = simfx.transform(model, x, token_ratio=0.05)
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1"]
    assert set(sim.simfx_info.calls) == {"blocks.0", "blocks.1"}
    plain = torch.fx.GraphModule(sim, plain_graph(sim))
    assert _saved_bytes(lambda: plain(x)) == _saved_bytes(lambda: model(x))  # inlined, it saved ~2.3x

    def heads():
        e = model.embed(x)
        y0 = model.blocks[0](e)
        return sim.simfx.blocks_0(e, y0), sim.simfx.blocks_1(y0, model.blocks[1](y0))

    torch.manual_seed(0)
    with_sim = _saved_bytes(lambda: sim(x))
    torch.manual_seed(0)
    # what the model saves, and what the reconstructors save (plus the loss aggregate's few scalars)
    assert with_sim <= _saved_bytes(heads) + _saved_bytes(lambda: model.head(torch.zeros(8, 32, 64))) + 1024
    out, loss = sim(x)
    (out.sum() + loss).backward()
    assert model.blocks[0].layers[0][0].weight.grad is not None


class RootCheckpointNet(nn.Module):
    """Checkpointing written in a container's own forward, as many encoders do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = Encoder()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Residual(16) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


def test_checkpointing_in_traced_code_keeps_that_module_as_one_call():
    model = RootCheckpointNet()
    x = torch.randn(4, 6, 8)
    sim = simfx.transform(model, x, frontend="fx")
    assert "torch.utils.checkpoint" in sim.simfx_info.opaque["encoder"]
    assert [b.name for b in sim.sim_blocks] == ["encoder"]  # its layers run inside its own call
    plain = torch.fx.GraphModule(sim, plain_graph(sim))
    assert _saved_bytes(lambda: plain(x)) == _saved_bytes(lambda: model(x))


# --- train/eval flags ---------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth as timm writes it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class DropPathBlock(Residual):
    def __init__(self, width: int):
        super().__init__(width)
        self.drop_path = DropPath(0.9)

    def forward(self, x):
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class DropPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(DropPathBlock(16), DropPathBlock(16), DropPathBlock(16))
        self.head = nn.Linear(16, 2)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        return self.head(self.drop_path(self.blocks(self.embed(x))))


def test_modes_set_on_the_users_own_modules_are_followed():
    model = DropPathNet()
    x = torch.randn(8, 4, 8)
    sim = simfx.transform(model, x, token_ratio=1.0)  # every token: SIM draws no random numbers
    assert sim.training and model.training
    model.eval()  # on the user's own object: sim follows, with the model's own forward
    assert not sim.training
    out, zero = sim(x)
    assert float(zero) == 0.0 and torch.equal(out, model(x))
    sim.train()
    assert model.training and all(m.training for m in model.modules())
    model.blocks[1].eval()  # stochastic depth off in one block (a call of its module)
    _outputs_match(_train_output(sim, x)[0], _train_output(model, x))
    model.drop_path.eval()  # traced code read this flag while tracing in training mode
    with pytest.raises(simfx.FaithfulnessError, match=r"module 'drop_path' is in eval mode.*self\.training.*leaf_modules=\['drop_path'\]"):
        sim(x)
    sim2 = simfx.transform(model, x, leaf_modules=["drop_path"], token_ratio=1.0)
    _outputs_match(_train_output(sim2, x)[0], _train_output(model, x))


class FreezesBatchNorm(Stage):
    """A model whose train() keeps its BatchNorm layers in eval mode (detection-style fine-tuning)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def test_sim_train_runs_the_models_own_train_method():
    model = FreezesBatchNorm()
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x).train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = model.layer1[0].bn1.running_mean.clone()
    out, loss = sim(x)
    assert torch.equal(stats, model.layer1[0].bn1.running_mean) and torch.equal(out, model(x))


# --- random decisions with no tensor input ---------------------------------------------------


class LayerDropEncoder(nn.Module):
    """Hugging Face's LayerDrop: each layer is skipped with probability layerdrop in training."""

    def __init__(self, layers: int = 4, layerdrop: float = 0.5):
        super().__init__()
        self.layerdrop = layerdrop
        self.layers = nn.ModuleList([Residual(16) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x)
        return x


class LayerDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.pre = nn.Sequential(Residual(16), Residual(16))
        self.encoder = LayerDropEncoder()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(self.pre(self.embed(x))))


def test_a_random_decision_with_no_tensor_input_is_drawn_every_step():
    model = LayerDropNet()
    x = torch.randn(4, 5, 8)
    sim = simfx.transform(model, x)
    assert "random" in sim.simfx_info.opaque["encoder"]
    assert [b.name for b in sim.sim_blocks] == ["pre.0", "pre.1", "encoder"]  # the encoder as one call
    plain = torch.fx.GraphModule(sim, plain_graph(sim))  # the training graph without SIM
    outputs = set()
    for seed in range(6):  # the model's own draw, every step: the model's outputs for each seed
        expected = _train_output(model, x, seed=seed)
        assert torch.equal(_train_output(plain, x, seed=seed), expected)
        outputs.add(tuple(expected.flatten()[:4].tolist()))
    assert len(outputs) > 1  # different layers dropped on different steps


class PythonRandomRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        import random

        if self.training and random.random() < 0.5:
            x = x.flip(1)
        return self.head(self.blocks(x))


def test_a_random_decision_in_the_models_own_forward_is_refused_with_the_line():
    with pytest.raises(simfx.FaithfulnessError, match=r"random\.random.*test_faithful\.py:\d+.*move that code into a submodule"):
        simfx.transform(PythonRandomRoot(), torch.randn(2, 4, 8), frontend="fx")


# --- Python state a forward changes ---------------------------------------------------------------


class _Net(nn.Module):
    """A stem, two residual layers and a head, for the state-keeping models below."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = nn.ModuleList([Residual(16), Residual(16)])
        self.head = nn.Linear(16, 2)

    def body(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return h


class WarmupBlend(_Net):
    """A warm-up schedule on a step counter the model keeps (``self.steps += 1``)."""

    def __init__(self):
        super().__init__()
        self.steps, self.warmup = 0, 4

    def forward(self, x):
        if self.training:
            self.steps += 1
        return self.head(self.body(x)) * min(1.0, self.steps / self.warmup)


class MemoryBank(_Net):
    """Past batch means kept in a list and blended into the output."""

    def __init__(self):
        super().__init__()
        self.bank = []

    def forward(self, x):
        h = self.body(x)
        self.bank.append(float(len(self.bank)))
        return self.head(h) * (1 + 0.1 * len(self.bank))


class CountingLayer(Residual):
    """A layer whose contribution shrinks with its calls: a curriculum kept in a dict."""

    def __init__(self, width):
        super().__init__(width)
        self.stats = {"calls": 0}

    def forward(self, x):
        self.stats["calls"] = self.stats["calls"] + 1
        return x + (super().forward(x) - x) / self.stats["calls"]


class Curriculum(_Net):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([CountingLayer(16), CountingLayer(16)])

    def forward(self, x):
        return self.head(self.body(x))


class ConfigSchedule(_Net):
    """A step counted on a config object (not a module): what recording does not see, the check does."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(step=0)

    def forward(self, x):
        self.config.step += 1
        return self.head(self.body(x)) * min(1.0, self.config.step / 4)


def _drift(sim, reference, steps: int = 4) -> float:
    """The largest difference between the transformed module's training outputs and the model's own, step by step."""
    sim.train(), reference.train()
    largest = 0.0
    for step in range(steps):
        x = torch.randn(3, 8)
        torch.manual_seed(step), np.random.seed(step)
        out, _ = sim(x)
        torch.manual_seed(step), np.random.seed(step)
        largest = max(largest, float((out - reference(x)).abs().max()))
    return largest


@pytest.mark.parametrize("model_class, found", [
    (WarmupBlend, r"the model's own forward sets self\.steps in its forward.*test_faithful\.py:\d+ `self\.steps \+= 1`"),
    (MemoryBank, r"changes self\.bank \(append\) in its forward.*test_faithful\.py:\d+ `self\.bank\.append"),
])
def test_state_the_models_own_forward_changes_is_refused_by_fx_and_kept_by_default(model_class, found):
    model = model_class()
    with pytest.raises(simfx.FaithfulnessError, match=rf"(?s){found}.*frontend='export' \(the model then trains itself"):
        simfx.transform(model, torch.randn(2, 8), frontend="fx")
    reference = copy.deepcopy(model)
    sim = simfx.transform(model, torch.randn(2, 8))  # auto: the model trains itself
    assert sim.simfx_info.runtime == "model"
    assert _drift(sim, reference) == 0.0


def test_state_a_block_changes_keeps_that_block_one_call():
    model = Curriculum()
    reference = copy.deepcopy(model)
    sim = simfx.transform(model, torch.randn(2, 8), frontend="fx")
    assert sim.simfx_info.plan.names == ["layers.0", "layers.1"]
    assert set(sim.simfx_info.calls) == {"layers.0", "layers.1"}  # the blocks run their own code every step
    assert _drift(sim, reference) == 0.0
    # Not chosen as blocks, they are kept opaque (one call each) for the same reason.
    model = Curriculum()
    reference = copy.deepcopy(model)
    sim = simfx.transform(model, torch.randn(2, 8), frontend="fx", blocks=["stem"])
    assert "changes self.stats (__setitem__) in its forward" in sim.simfx_info.opaque["layers.0"]
    assert _drift(sim, reference) == 0.0


def test_state_recording_cannot_see_shows_on_the_checks_second_step():
    model = ConfigSchedule()
    with pytest.raises(simfx.FaithfulnessError, match=r"on a second training step: state its forward changes"):
        simfx.transform(model, torch.randn(2, 8), frontend="fx")
    reference = copy.deepcopy(model)
    assert _drift(simfx.transform(model, torch.randn(2, 8)), reference) == 0.0


@pytest.mark.parametrize("model_class", [WarmupBlend, MemoryBank, Curriculum, ConfigSchedule])
def test_transforming_leaves_the_models_python_state_as_it_was(model_class):
    model = model_class()
    before = copy.deepcopy(model)
    simfx.transform(model, torch.randn(2, 8))
    simfx.find_boundaries(model, torch.randn(2, 8), frontend="export")
    assert getattr(model, "steps", None) == getattr(before, "steps", None)
    assert getattr(model, "bank", None) == getattr(before, "bank", None)
    assert vars(getattr(model, "config", types.SimpleNamespace())) == vars(getattr(before, "config", types.SimpleNamespace()))
    for layer, original in zip(model.layers, before.layers):
        assert getattr(layer, "stats", None) == getattr(original, "stats", None)


def test_transforming_leaves_the_random_generators_a_model_keeps_where_they_were():
    model = NumpyLayerDrop("generator")
    state = model.rng.bit_generator.state
    simfx.transform(model, torch.randn(2, 8))
    assert model.rng.bit_generator.state == state


class NumpyLayerDrop(_Net):
    """LayerDrop drawn with NumPy, in the three spellings people use."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling, self.layerdrop = spelling, 0.5
        self.rng = np.random.default_rng(0)

    def draw(self):
        if self.spelling == "module":
            return np.random.uniform(0, 1)
        if self.spelling == "imported":
            return imported_uniform(0, 1)
        return self.rng.uniform(0, 1)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            if self.training and self.draw() < self.layerdrop:
                continue
            h = layer(h)
        return self.head(h)


@pytest.mark.parametrize("spelling, what", [
    ("module", r"numpy\.random\.uniform\), which a trace makes once and freezes at test_faithful\.py:\d+"),
    ("imported", r"a draw from NumPy's global generator"),
    ("generator", r"a draw from self\.rng \(Generator\)"),
])
def test_numpy_draws_are_refused_by_fx_whatever_the_seed_and_drawn_by_the_model_by_default(spelling, what):
    for seed in range(4):  # each draw outcome at trace time: refused by what the trace saw, not by luck
        np.random.seed(seed)
        with pytest.raises(simfx.FaithfulnessError, match=rf"draws a random number with no tensor input \({what}"):
            simfx.transform(NumpyLayerDrop(spelling), torch.randn(2, 8), frontend="fx")
    model = NumpyLayerDrop(spelling)
    reference = copy.deepcopy(model)
    sim = simfx.transform(model, torch.randn(2, 8))
    assert sim.simfx_info.runtime == "model" and _drift(sim, reference) == 0.0


# --- in-place updates of aliased values ----------------------------------------------------------


class AliasedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        skip = h  # another reference to the tensor updated in place below
        h += self.mix(x)
        h.add_(1.0)
        return self.head(self.blocks(h) + skip)


def test_inplace_updates_of_aliased_values_are_kept():
    model = AliasedResidual()
    x = torch.randn(3, 4, 8)
    sim = simfx.transform(model, x)
    assert sim.simfx_info.check == "passed"
    out, _ = sim(x)
    assert torch.equal(out, model(x))
    sim.eval()
    assert torch.equal(sim(x)[0], model(x))


# --- isinstance on an opaque module's output --------------------------------------------------------


class Untraceable(nn.Module):
    """Returns (features, aux) and branches on data: fx keeps it opaque."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 1e9:
            y = y * 0.5
        return y, y.mean()


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.body = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 8))
        self.inner = Untraceable()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out = self.inner(self.body(self.stem(x)))
        features = out[0] if isinstance(out, (tuple, list)) else out
        return self.head(features.mean(dim=(2, 3)))


def test_isinstance_on_an_opaque_modules_tuple_output_sees_the_tuple():
    model = Wrapper()
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x, frontend="fx")
    out, _ = sim(x)
    assert out.shape == (2, 2) and torch.equal(out, model(x))


# --- blocks that modify their input in place ------------------------------------------------------------


class ReluFirst(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if self.how == "torch.relu_":
            torch.relu_(x)
        elif self.how == "F.relu_":
            F.relu_(x)
        else:
            x[:, :4] = 0
        return x + self.conv(x)


@pytest.mark.parametrize("how", ["torch.relu_", "F.relu_", "setitem"])
def test_blocks_that_modify_their_input_in_place_are_not_selected(how):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ReluFirst(how), ReluFirst(how), ConvBlock(8, 8), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise the lazy head
    table = simfx.find_boundaries(model, x)
    rows = {r.name: r for r in table}
    for name in ("1", "2"):
        assert not rows[name].selected and "modifies its input" in rows[name].decision
    assert rows["3"].selected
    with pytest.raises(simfx.SelectorError, match=r"'1': modifies its input '.*' in place"):
        simfx.transform(model, x, blocks=["1"])


# --- dict-subclass outputs -----------------------------------------------------------------------------


class Output(dict):
    """Like Hugging Face's ModelOutput: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HiddenStates(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(Residual(8), Residual(8))

    def forward(self, x):
        return Output(last_hidden_state=self.layers(x), pooled=x.mean(1))


class WithOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = HiddenStates()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out = self.encoder(x)
        return Output(logits=self.head(out.last_hidden_state), pooled=out.pooled)


def test_a_submodule_returning_a_dict_subclass_keeps_its_type():
    model = WithOutputs()
    x = torch.randn(2, 5, 8)
    sim = simfx.transform(model, x)
    out, _ = sim(x)
    assert type(out) is Output
    _outputs_match(out, model(x))


# --- wrapped models --------------------------------------------------------------------------------------


def test_wrapped_models_are_refused_or_unwrapped_with_a_message():
    model = Stage()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(simfx.UnsupportedModelError, match=r"DataParallel-wrapped.*simfx\.transform\(model\.module"):
        simfx.transform(nn.DataParallel(model), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(simfx.UnsupportedModelError, match=r"TorchScript module.*Transform the nn\.Module you scripted"):
        simfx.transform(scripted, torch.randn(2, 4))
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match=r"torch\.compile-d module.*Compile the result"):
        sim = simfx.transform(compiled, x)
    assert simfx.strip(sim) is model


# --- torch.nn containers that hide their layers -----------------------------------------------------------


class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_a_transformer_encoder_model_switches_to_export_with_auto():
    model = TransformerClassifier()
    x = torch.randn(2, 6, 8)
    table = simfx.find_boundaries(model, x, frontend="fx")  # fx keeps torch.nn's encoder as one call
    assert [r.name for r in table.selected()] == ["encoder"]
    assert "TransformerEncoder" in table.opaque["encoder"]
    sim = simfx.transform(model, x)
    assert sim.simfx_info.frontend == "export" and sim.simfx_info.check == "passed"
    assert [b.name for b in sim.sim_blocks][:2] == ["encoder.layers.0", "encoder.layers.1"]
    out, loss = sim(x)
    (out.sum() + loss).backward()
    sim.eval()
    with torch.no_grad():
        assert torch.equal(sim(x)[0], model(x))


# --- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -1e-3])
def test_beta_must_be_finite_and_not_negative(beta):
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0"):
        simfx.SimOptions(beta=beta)


def test_numpy_and_zero_dim_tensor_scalars_are_accepted_as_options():
    options = simfx.SimOptions(beta=np.float32(1e-2), token_ratio=np.float64(0.5), dim=np.int64(16),
                               channel_ratio=torch.tensor(1.0))
    assert options.beta == pytest.approx(1e-2) and type(options.beta) is float
    assert options.dim == 16 and type(options.dim) is int and options.channel_ratio == 1.0
    sim = simfx.transform(Stage(), torch.randn(2, 3, 8, 8), beta=np.float32(0.1), dim=np.int32(8))
    assert sim.sim_blocks[0].options.dim == 8


# --- the check itself ------------------------------------------------------------------------------------------


class HiddenDetach(nn.Module):
    """A detach fx cannot see: a custom autograd Function that stops gradients (its backward is lost)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(StopGradient.apply(self.stem(x))))


def test_a_custom_backward_in_the_models_own_forward_is_refused():
    with pytest.raises(simfx.FaithfulnessError, match=r"custom autograd Function .*StopGradient.*move that code into a submodule"):
        simfx.transform(HiddenDetach(), torch.randn(2, 4, 8), frontend="fx")


def test_the_check_can_be_skipped_and_says_so():
    sim = simfx.transform(Stage(), torch.randn(2, 3, 8, 8), check=False)
    assert sim.simfx_info.check == "skipped: check=False"
    meta = Stage().to("meta")
    sim = simfx.transform(meta, torch.randn(2, 3, 8, 8, device="meta"))
    assert sim.simfx_info.check.startswith("skipped: the model or the example inputs are on the meta device")


def test_the_check_leaves_no_trace_on_the_model():
    model = torchvision.models.resnet18(num_classes=4)
    before = copy.deepcopy(model.state_dict())
    sim = simfx.transform(model, torch.randn(2, 3, 32, 32))
    assert sim.simfx_info.check == "passed"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim(torch.randn(2, 3, 32, 32))
