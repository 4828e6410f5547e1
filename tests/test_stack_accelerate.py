"""``accelerator.prepare(sim, optimizer, loader)`` and ``accelerator.backward(loss)`` with a transformed model, on CPU.

The README's "Training with Accelerate" block runs as written; its state dict, taken
through the Accelerator, loads into the plain model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import simfx
from conftest import TinyResNet

accelerate = pytest.importorskip("accelerate")

from readme_blocks import run_readme_block  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    # Accelerate keeps one process-wide state: each test builds its Accelerator from scratch.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def loader():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 5, (12,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_readme_block_trains_with_accelerate(mixed_precision, monkeypatch):
    # The README block builds a plain Accelerator(); this is how accelerate reads its precision.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed_precision)
    model = TinyResNet()
    initial = copy.deepcopy(model.state_dict())
    sim = simfx.transform(model, torch.randn(2, 3, 16, 16))
    reconstructors = {n: p.detach().clone() for n, p in sim.named_parameters() if n.startswith("simfx.")}
    plain = TinyResNet()
    losses = []
    sim.register_forward_hook(lambda module, args, output: losses.append(output[1].detach()))
    ns = run_readme_block("accelerate", simfx=simfx, torch=torch, F=F, sim=sim, loader=loader(), plain_model=plain)

    assert ns["accelerator"].mixed_precision == mixed_precision
    assert len(losses) == 3 and all(loss.dtype == torch.float32 and loss > 0 for loss in losses)
    # Three optimizer steps moved the model and every reconstructor weight.
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    trained = dict(sim.named_parameters())
    assert all(not torch.equal(trained[n], v) for n, v in reconstructors.items() if n.endswith("weight"))
    # The state dict taken through the Accelerator loads into the plain model (strict) and matches.
    x = torch.randn(2, 3, 16, 16)
    plain.eval(), sim.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), simfx.strip(sim)(x), rtol=0, atol=0)
