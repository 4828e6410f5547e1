"""The objective family: self_model and activation_l2 by hand, per-block choice and
weights, user-registered objectives end to end, and per-block losses under compile."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

import simfx
import simfx.runtime.objectives as objectives
from conftest import TinyResNet
from simfx.runtime.heads import build_objective
from simfx.options import SimOptions


@pytest.fixture
def registry(monkeypatch):
    """The objective registry as it was before the test, restored after (registrations do not leak)."""
    registry = objectives.OBJECTIVES
    saved = {name: registry.get(name) for name in registry.names()}
    yield registry
    for name in registry.names():
        if name not in saved:
            registry.unregister(name)
    for spec in saved.values():
        registry.add(spec, overwrite=True)


def conv_head(objective, channels=6, **options):
    opts = SimOptions(objective=objective, **options)
    return build_objective(opts, in_channel_dim=1, out_channel_dim=1, in_width=channels, out_width=channels)


def tokens64(y):
    """NCHW -> (B, HW, C) in float64, written out independently of simfx.runtime.tokens."""
    b, c, h, w = y.shape
    return y.double().permute(0, 2, 3, 1).reshape(b, h * w, c)


# --- the built-in objectives against DESIGN.md, by hand ----------------------------


def test_self_model_is_mean_squared_self_prediction_error_with_detached_target():
    """self_model: mean over samples and tokens of ||(W a + b) - a||^2; the target a is detached."""
    head = conv_head("self_model", token_ratio=1.0)
    y = torch.randn(2, 6, 3, 3, requires_grad=True)
    loss = head(torch.randn(2, 6, 3, 3), y)

    W = head.objective.linear.weight.detach().double()
    b = head.objective.linear.bias.detach().double()
    a = tokens64(y.detach())  # (2, 9, 6)
    error = a @ W.T + b - a
    want = error.square().sum(-1).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)

    # With the target detached, d loss / d a = 2 (W a + b - a) W / (B N), not 2 (W - I)^T (...).
    loss.backward()
    grad_tokens = 2 * error @ W / (a.shape[0] * a.shape[1])
    want_grad = grad_tokens.reshape(2, 3, 3, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(y.grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    # The self-model itself learns: d loss / d W = 2 error^T a / (B N).
    want_w = 2 * error.reshape(-1, 6).T @ a.reshape(-1, 6) / 18
    torch.testing.assert_close(head.objective.linear.weight.grad.double(), want_w, rtol=1e-5, atol=1e-7)


def test_self_model_at_identity_costs_nothing():
    head = conv_head("self_model", token_ratio=1.0)
    with torch.no_grad():
        head.objective.linear.weight.copy_(torch.eye(6))
        head.objective.linear.bias.zero_()
    assert head(None, torch.randn(2, 6, 3, 3)).item() == pytest.approx(0.0, abs=1e-10)


def test_activation_l2_on_sampled_tokens_by_hand():
    """activation_l2: mean ||a||^2 over the k sampled tokens; gradient 2a/(B k) there, 0 elsewhere."""
    head = conv_head("activation_l2", token_ratio=0.25, token_sampling="per_sample")
    x, y = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4, requires_grad=True)
    torch.manual_seed(11)
    loss = head(x, y)
    # The random-number contract of simfx.runtime.tokens: per_sample draws rand(B, N).argsort.
    torch.manual_seed(11)
    index = torch.rand(3, 16).argsort(dim=1)[:, :4]
    a = tokens64(y.detach())
    picked = torch.stack([a[i, index[i]] for i in range(3)])
    torch.testing.assert_close(loss.double(), picked.square().sum(-1).mean(), rtol=1e-6, atol=1e-6)

    loss.backward()
    want = torch.zeros_like(a)
    for i in range(3):
        want[i, index[i]] = 2 * a[i, index[i]] / (3 * 4)
    want = want.reshape(3, 4, 4, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(y.grad.double(), want, rtol=1e-5, atol=1e-7)
    assert not any(True for _ in head.parameters())  # nothing to learn


def test_input_free_objectives_never_see_the_input():
    for name in ("self_model", "activation_l2"):
        head = conv_head(name)
        seen = []
        head.objective.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        loss = head(torch.full((2, 6, 3, 3), float("nan")), torch.randn(2, 6, 3, 3))
        assert seen == [None] and torch.isfinite(loss), name  # a NaN input is irrelevant to them


# --- choosing objectives and weights per block ------------------------------------------


def _block_io(model, x):
    """(input, output) of each TinyResNet block, recomputed eagerly in train mode.

    The transformed graph inlines the blocks (only leaf layers are modules there), so
    hooks on them never fire; in train mode BatchNorm uses batch statistics, so the
    eager recomputation gives the same activations.
    """
    seen = {}
    with torch.no_grad():
        h = model.stem(x)
        for i, block in enumerate(model.blocks):
            out = block(h)
            seen[f"blocks.{i}"] = (h, out)
            h = out
    return seen


def test_objective_per_transform_and_per_block():
    x = torch.randn(2, 3, 16, 16)
    sim = simfx.transform(TinyResNet(), x, objective="self_model")
    assert {type(h.objective).__name__ for h in sim.simfx.values()} == {"SelfModel"}
    sim = simfx.transform(TinyResNet(), x, overrides={"blocks.1": {"objective": "activation_l2"}})
    kinds = [type(sim.simfx[b.key].objective).__name__ for b in sim.sim_blocks]
    assert kinds == ["RhoSim", "ActivationL2", "RhoSim"]
    with pytest.raises(ValueError, match="unknown objective 'self_modle'.*'self_model'"):
        simfx.transform(TinyResNet(), x, overrides={"blocks.1": {"objective": "self_modle"}})


def test_mixed_objectives_and_betas_aggregate_as_mean_of_weighted_block_losses():
    model = TinyResNet()
    x = torch.randn(4, 3, 16, 16)
    sim = simfx.transform(
        model, x, per_block=True, token_ratio=1.0,
        overrides={
            "blocks.0": {"beta": 0.01},  # rho_sim
            "blocks.1": {"objective": "self_model", "beta": 0.1},
            "blocks.2": {"objective": "activation_l2", "beta": 1e-3},
        },
    )
    out, sim_loss, per_block = sim(x)
    seen = _block_io(model, x)

    # Each block's value is its own objective on its own activations.
    a1 = tokens64(seen["blocks.1"][1])
    lin = sim.simfx["blocks_1"].objective.linear
    want1 = (a1 @ lin.weight.double().T + lin.bias.double() - a1).square().sum(-1).mean()
    torch.testing.assert_close(per_block["blocks.1"].double(), want1, rtol=1e-5, atol=1e-6)
    a2 = tokens64(seen["blocks.2"][1])
    torch.testing.assert_close(per_block["blocks.2"].double(), a2.square().sum(-1).mean(), rtol=1e-5, atol=1e-6)
    # sim_loss = mean_i(beta_i * loss_i).
    betas = {"blocks.0": 0.01, "blocks.1": 0.1, "blocks.2": 1e-3}
    want = sum(betas[n] * per_block[n] for n in betas) / 3
    torch.testing.assert_close(sim_loss, want)

    # Gradients: the self-model's and the reconstructor's parameters learn; the head after
    # the last block gets none from sim_loss alone.
    sim_loss.backward()
    assert sim.simfx["blocks_1"].objective.linear.weight.grad.abs().sum() > 0
    assert sim.simfx["blocks_0"].objective.predictor.weight.grad.abs().sum() > 0
    assert model.blocks[2].conv2.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None


# --- user-registered objectives ------------------------------------------------------------


class LinearRecon(nn.Module):
    """A user objective: reconstruct the block's input tokens linearly from its output tokens."""

    built = []

    def __init__(self, in_channels, out_channels, options):
        super().__init__()
        self.map = nn.Linear(out_channels, in_channels)
        LinearRecon.built.append((in_channels, out_channels, options.beta))
        self.inputs_required_grad = None

    def forward(self, x_tokens, y_tokens):
        self.inputs_required_grad = x_tokens.requires_grad
        return (self.map(y_tokens) - x_tokens).square().mean()


def test_user_objective_end_to_end(registry):
    LinearRecon.built.clear()
    simfx.register_objective("linear_recon", LinearRecon)
    assert "linear_recon" in simfx.objective_names()
    model = TinyResNet()
    x = torch.randn(4, 3, 16, 16)
    sim = simfx.transform(model, x, objective="linear_recon", beta=0.5, token_ratio=1.0, per_block=True)
    # One module per block, built from the block's channel counts and options.
    assert LinearRecon.built == [(8, 8, 0.5), (8, 16, 0.5), (16, 16, 0.5)]
    assert [n for n, _ in sim.named_parameters() if n.endswith("map.weight")] == [
        "simfx.blocks_0.objective.map.weight", "simfx.blocks_1.objective.map.weight",
        "simfx.blocks_2.objective.map.weight",
    ]

    out, sim_loss, per_block = sim(x)
    seen = _block_io(model, x)
    for name, key in (("blocks.0", "blocks_0"), ("blocks.1", "blocks_1"), ("blocks.2", "blocks_2")):
        block_in, block_out = seen[name]
        if block_in.shape[2:] != block_out.shape[2:]:  # the strided block: input pooled onto the output grid
            block_in = nn.functional.adaptive_avg_pool2d(block_in, block_out.shape[2:])
        head = sim.simfx[key].objective
        assert head.inputs_required_grad is False  # the target side is detached
        want = (head.map(tokens64(block_out).float()) - tokens64(block_in).float()).square().mean()
        torch.testing.assert_close(per_block[name], want)
    torch.testing.assert_close(sim_loss, 0.5 * torch.stack(list(per_block.values())).mean())

    (out.square().mean() + sim_loss).backward()
    for name, p in sim.simfx.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    sim.eval()
    _, zero, _ = sim(x)
    assert zero.item() == 0.0


def test_user_objective_without_input_gets_none(registry):
    calls = []

    @simfx.register_objective("mean_abs", uses_input=False)
    def make(cin, cout, options):
        return _MeanAbs(calls)

    out, sim_loss = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), objective="mean_abs")(
        torch.randn(2, 3, 16, 16)
    )
    assert calls == [None, None, None] and sim_loss > 0


class _MeanAbs(nn.Module):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, x_tokens, y_tokens):
        self.calls.append(x_tokens)
        return y_tokens.abs().mean()


def test_user_objective_errors_name_the_objective(registry):
    with pytest.raises(TypeError, match="objective factory for 'bad' must be callable"):
        simfx.register_objective("bad", 3)
    simfx.register_objective("not_a_module", lambda cin, cout, options: (lambda x, y: y.mean()))
    with pytest.raises(TypeError, match="objective 'not_a_module' factory returned function, not an nn.Module"):
        simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), objective="not_a_module")
    simfx.register_objective("twice", LinearRecon)
    with pytest.raises(ValueError, match="'twice' is already registered; pass overwrite=True"):
        simfx.register_objective("twice", LinearRecon)
    simfx.register_objective("twice", LinearRecon, overwrite=True)


def test_register_objective_docstring_example_runs(registry):
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(objectives.register_objective, "register_objective", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
    assert "feature_variance" in simfx.objective_names()


# --- per-block losses under torch.compile --------------------------------------------------


@pytest.fixture
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
def test_per_block_output_is_one_graph_without_breaks():
    x = torch.randn(4, 3, 16, 16)
    sim = simfx.transform(
        TinyResNet(), x, per_block=True, overrides={"blocks.1": {"objective": "self_model", "beta": 0.1}}
    )
    report = dynamo.explain(sim)(x)
    assert report.graph_count == 1
    assert report.graph_break_count == 0, report.break_reasons

    backend = CompileCounter()
    compiled = torch.compile(sim, backend=backend, fullgraph=True)
    for _ in range(2):
        with dynamo.config.patch(error_on_recompile=backend.frame_count > 0):
            out, sim_loss, per_block = compiled(x)
            (out.square().mean() + sim_loss).backward()
    assert backend.frame_count == 1
    assert list(per_block) == ["blocks.0", "blocks.1", "blocks.2"]
    # The compiled per-block values add up to the compiled total.
    weights = torch.tensor([5e-3, 0.1, 5e-3])
    torch.testing.assert_close(sim_loss, (weights * torch.stack(list(per_block.values()))).mean())
