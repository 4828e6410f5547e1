"""Checkpoints: stop mid-training, rebuild from scratch, load, continue as if never stopped.

A transformed module's ``state_dict`` holds the model's own entries under their
original names plus the reconstructors under ``simfx.``; with the optimizer's
state and the RNG state saved alongside, a fresh ``simfx.transform`` of a fresh
model resumes bit for bit. The original model's weights come back from the
checkpoint alone with ``simfx.original_state_dict``.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import simfx

from conftest import TinyResNet

STEPS, STOP = 5, 2
OPTIONS = dict(token_sampling="per_sample", token_ratio=0.5)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


def _fresh(seed: int):
    torch.manual_seed(seed)
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8), **OPTIONS)
    optimizer = torch.optim.AdamW(sim.parameters(), lr=1e-2)
    return model, sim, optimizer


def _step(sim, optimizer, step: int) -> torch.Tensor:
    images, labels = _batch(step)
    sim.train()
    out, sim_loss = sim(images)
    (F.cross_entropy(out, labels) + sim_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sim_loss.detach()


def _save(sim, optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": sim.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uninterrupted():
    """Losses of an uninterrupted run, the checkpoint taken after STOP steps, and the final eval output."""
    model, sim, optimizer = _fresh(seed=0)
    torch.manual_seed(1234)   # the sampling RNG stream of the run
    losses, checkpoint = [], None
    for step in range(STEPS):
        if step == STOP:
            checkpoint = _save(sim, optimizer)
        losses.append(_step(sim, optimizer, step))
    return losses, checkpoint


def test_resuming_from_a_checkpoint_continues_bit_for_bit(uninterrupted):
    losses, checkpoint = uninterrupted
    # A new process would start from another seed: nothing but the checkpoint carries over.
    model, sim, optimizer = _fresh(seed=99)
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    sim.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    resumed = [_step(sim, optimizer, step) for step in range(STOP, STEPS)]
    for expected, got in zip(losses[STOP:], resumed):
        assert torch.equal(expected, got), (losses[STOP:], resumed)


def test_the_original_weights_come_back_from_the_checkpoint_alone(uninterrupted):
    _, checkpoint = uninterrupted
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)["model"]
    assert any(k.startswith("simfx.") for k in state)
    plain = TinyResNet()
    plain.load_state_dict(simfx.original_state_dict(state), strict=True)
    # Same weights as the transformed module at that point: same eval output.
    _, sim, _ = _fresh(seed=5)
    sim.load_state_dict(state, strict=True)
    x = _batch(0)[0]
    sim.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(sim(x)[0], plain(x))


def test_a_checkpoint_of_the_plain_model_starts_a_transformed_one():
    # The other direction: pretrained weights of the original architecture load into
    # the transformed module's original entries; only the reconstructors are new.
    pretrained = TinyResNet().state_dict()
    _, sim, _ = _fresh(seed=3)
    missing, unexpected = sim.load_state_dict(pretrained, strict=False)
    assert not unexpected and missing and all(k.startswith("simfx.") for k in missing)
    assert torch.equal(sim.state_dict()["stem.weight"], pretrained["stem.weight"])
