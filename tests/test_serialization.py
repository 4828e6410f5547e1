"""strip, deepcopy, pickle and torch.save of transformed modules."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision

import simfx
from conftest import TinyResNet


def _train_steps(sim, steps=2, shape=(4, 3, 16, 16)):
    opt = torch.optim.SGD(sim.parameters(), lr=0.1)
    sim.train()
    for _ in range(steps):
        out, loss = sim(torch.randn(*shape))
        (out.square().mean() + loss).backward()
        opt.step()
        opt.zero_grad()


def test_strip_loads_into_the_original_architecture_with_buffers():
    model = torchvision.models.resnet18(num_classes=10)
    sim = simfx.transform(model, torch.randn(2, 3, 32, 32))
    _train_steps(sim, shape=(4, 3, 32, 32))
    plain = simfx.strip(sim)
    assert plain is model  # the model's own computation, not a graph of it
    assert not any(k.startswith("simfx.") for k in plain.state_dict())
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert fresh.bn1.num_batches_tracked.item() == 2
    torch.testing.assert_close(fresh.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean, rtol=0, atol=0)
    # same parameters (shared objects), its own forward in both modes
    assert plain.conv1.weight is sim.conv1.weight
    copied = simfx.transform(model, torch.randn(2, 3, 32, 32), copy=True)
    assert simfx.strip(copied) is not model and simfx.strip(copied).conv1 is copied.conv1
    x = torch.randn(2, 3, 32, 32)
    plain.eval()
    fresh.eval()
    assert torch.equal(plain(x), fresh(x))
    plain.train()
    assert plain(x).shape == (2, 10)


def test_original_weights_recoverable_from_a_checkpoint(tiny_resnet):
    sim = simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16))
    _train_steps(sim)
    checkpoint = sim.state_dict()
    fresh = TinyResNet()
    fresh.load_state_dict(simfx.original_state_dict(checkpoint), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, checkpoint[k])


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_are_independent_and_equivalent(tiny_resnet, how):
    sim = simfx.transform(tiny_resnet, torch.randn(2, 3, 16, 16), per_block=True)
    _train_steps_per_block(sim)
    if how == "deepcopy":
        clone = copy.deepcopy(sim)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(sim))
    else:
        buffer = io.BytesIO()
        torch.save(sim, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert isinstance(clone, simfx.SimGraphModule)
    assert type(clone).__name__ == "SimGraphModule"
    assert [b.name for b in clone.sim_blocks] == [b.name for b in sim.sim_blocks]
    assert clone.code == sim.code
    assert clone.simfx_model() is not sim.simfx_model()
    assert dict(clone.simfx_model().named_modules())['blocks.0'] is clone.blocks[0]
    # equal state, separate storage
    for (k, a), (k2, b) in zip(sim.state_dict().items(), clone.state_dict().items()):
        assert k == k2 and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    a = sim(x)
    torch.manual_seed(5)
    b = clone(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sim.eval()
    clone.eval()
    assert torch.equal(sim(x)[0], clone(x)[0])
    # the clone still strips and trains
    simfx.strip(clone)
    _train_steps_per_block(clone)


def _train_steps_per_block(sim):
    opt = torch.optim.SGD(sim.parameters(), lr=0.1)
    sim.train()
    out, loss, per_block = sim(torch.randn(4, 3, 16, 16))
    (out.square().mean() + loss).backward()
    opt.step()


def test_deepcopy_keeps_shared_parameters_shared():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].weight = model[0].weight  # tied
    sim = simfx.transform(model, torch.randn(3, 4))
    clone = copy.deepcopy(sim)
    first, second = clone.get_submodule("0"), clone.get_submodule("1")
    assert first.weight is second.weight
    assert first.weight is not sim.get_submodule("0").weight
