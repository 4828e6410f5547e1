"""Mixed precision on CPU: SIM keeps training its reconstructors under autocast.

Regression for issue 16: on torch 2.5, autocast's weight-cast cache let the rho_sim
prediction branch reuse the casts that the no-grad target branch had made of the
shared projector's weights, so every ``objective.proj.*`` parameter got no gradient
under ``torch.autocast``. These tests fail on torch 2.5.1 without the fix in
``RhoSim.forward``; CI runs them on that version (see ``.ci/run``).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import simfx
from conftest import assert_reconstructor_gradients
from simfx.runtime.losses import sim_loss_value
from simfx.runtime.objectives import RhoSim


def test_every_reconstructor_parameter_of_resnet18_gets_a_gradient_under_bf16_autocast():
    sim = simfx.transform(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, sim_loss = sim(torch.randn(4, 3, 32, 32))
    sim_loss.backward()
    assert_reconstructor_gradients(sim.simfx.named_parameters())


def _reference(objective: RhoSim, x_tokens, y_tokens):
    """rho_sim by DESIGN.md with target first, in an autocast region that caches no cast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with torch.no_grad():
            target = objective.proj(x_tokens)
        prediction = objective.predictor(objective.proj(objective.pre_proj(y_tokens)))
        return sim_loss_value(prediction, target, objective.loss)


@pytest.mark.parametrize("widths", [(16, 16), (8, 24)], ids=["same-width", "pre-projected"])
def test_rho_sim_under_cached_autocast_matches_uncached_autocast(widths):
    """Same loss and same gradients as a region without the cast cache, on every torch."""
    cin, cout = widths
    objective = RhoSim(cin, cout, dim=32)
    x_tokens, y_tokens = torch.randn(3, 10, cin), torch.randn(3, 10, cout, requires_grad=True)

    expected = _reference(objective, x_tokens, y_tokens)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in objective.named_parameters()}
    expected_y_grad = y_tokens.grad.clone()
    objective.zero_grad(set_to_none=True)
    y_tokens.grad = None

    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled: the default users get
        loss = objective(x_tokens, y_tokens)
    loss.backward()

    assert torch.equal(loss, expected)
    for name, p in objective.named_parameters():
        assert p.grad is not None, f"{name} got no gradient under autocast"
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)
    torch.testing.assert_close(y_tokens.grad, expected_y_grad)
