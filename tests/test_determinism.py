"""Determinism: with a fixed seed, two eager runs give identical losses and gradients.

Every random choice simfx makes is a torch draw on the activation's device
(``torch.rand`` then ``argsort``; see :mod:`simfx.runtime.tokens`), so seeding torch
fixes the token samples, and the rest is ordinary deterministic kernels on CPU.
What holds under ``torch.compile`` is in the README ("Determinism").
"""

from __future__ import annotations

import pytest
import torch

import simfx

from conftest import InlineResidualNet, TinyResNet


def _run(make_model, example, batches, **options):
    """Seeded transform and three SGD steps: per-step sim losses, and the final gradients by name."""
    torch.manual_seed(0)
    model = make_model()
    sim = simfx.transform(model, example, per_block=True, **options)
    optimizer = torch.optim.SGD(sim.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(42)
    losses, grads = [], {}
    for x in batches:
        sim.train()
        out, sim_loss, per_block = sim(x)
        (out.float().pow(2).mean() + sim_loss).backward()
        losses.append((sim_loss.detach(), {k: v.detach() for k, v in per_block.items()}))
        grads = {n: p.grad.clone() for n, p in sim.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("sampling", ["shared", "per_sample", "topk_mean"])
@pytest.mark.parametrize("make_model, shape", [(TinyResNet, (4, 3, 8, 8)), (InlineResidualNet, (4, 6, 8))],
                         ids=["conv", "tokens"])
def test_two_seeded_eager_runs_are_identical(sampling, make_model, shape):
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(shape, generator=g) for _ in range(3)]
    example = torch.randn(shape)
    first = _run(make_model, example, batches, token_sampling=sampling)
    second = _run(make_model, example, batches, token_sampling=sampling)
    for (loss_a, blocks_a), (loss_b, blocks_b) in zip(first[0], second[0]):
        assert torch.equal(loss_a, loss_b)
        assert blocks_a.keys() == blocks_b.keys() and all(torch.equal(blocks_a[k], blocks_b[k]) for k in blocks_a)
    assert first[1].keys() == second[1].keys() and any(n.startswith("simfx.") for n in first[1])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_another_seed_draws_other_tokens():
    # The check above would pass trivially if sampling ignored the seed.
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    sim = simfx.transform(TinyResNet(), x)
    sim.train()
    torch.manual_seed(1)
    a = sim(x)[1]
    torch.manual_seed(2)
    b = sim(x)[1]
    assert not torch.equal(a, b)
