"""The eager fast paths equal the reference expressions they replace, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simfx.runtime.heads import build_objective
from simfx.runtime.losses import _NormMSE, norm_mse, norm_mse_reference
from simfx.options import SimOptions
from simfx.analysis.shapes import propagate_shapes
from simfx.runtime.tokens import input_tokens_on_output_grid, take_tokens, to_tokens
from simfx.capture.inputs import ExampleInputs
from simfx.capture.fx_trace import trace_model


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 2, 4), (4, 40, 128)])
def test_norm_mse_function_equals_the_expression_in_value_and_gradient(shape):
    torch.manual_seed(0)
    prediction = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(*shape, dtype=torch.float64)
    fast = norm_mse(prediction, target)
    assert fast.grad_fn is not None and "NormMSE" in type(fast.grad_fn).__name__  # the fast path ran
    reference = norm_mse_reference(prediction, target)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    (g_fast,) = torch.autograd.grad(fast, prediction)
    (g_ref,) = torch.autograd.grad(reference, prediction)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    if prediction.numel() < 200:  # numerical gradcheck costs one forward per input element
        assert torch.autograd.gradcheck(lambda p: _NormMSE.apply(p, target), (prediction,))


def test_norm_mse_function_with_constant_features_and_zero_residual_matches_torch():
    # std = 0 in a feature and rows whose residual is exactly 0: torch masks both
    # gradients to 0 (std and norm backward); the Function must do the same.
    prediction = torch.randn(2, 4, 3, dtype=torch.float64)
    prediction[:, :, 0] = 1.5
    prediction.requires_grad_(True)
    target = prediction.detach().clone()
    for t in (target, torch.randn(2, 4, 3, dtype=torch.float64)):
        (g_fast,) = torch.autograd.grad(norm_mse(prediction, t), prediction)
        (g_ref,) = torch.autograd.grad(norm_mse_reference(prediction, t), prediction)
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)


def test_norm_mse_takes_the_expression_when_the_target_needs_a_gradient():
    prediction = torch.randn(2, 6, 5, requires_grad=True)
    target = torch.randn(2, 6, 5, requires_grad=True)
    loss = norm_mse(prediction, target)
    assert "NormMSE" not in type(loss.grad_fn).__name__
    loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_norm_mse_function_refuses_double_backward_instead_of_a_wrong_answer():
    prediction = torch.randn(2, 6, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(norm_mse(prediction, torch.randn(2, 6, 5)), prediction, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["x", "y"])
def test_finite_check_catches_every_non_finite_value(bad, side):
    options = SimOptions(token_ratio=1.0)
    head = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    (x if side == "x" else y)[1, 2, 0, 1] = bad
    y.requires_grad_(True)
    loss = head(x, y)
    assert torch.isnan(loss)
    loss.nan_to_num(0.0).backward()  # the zeroed inputs keep NaN out of the gradients
    assert torch.isfinite(y.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


def test_finite_check_keeps_huge_finite_values():
    options = SimOptions(token_ratio=1.0, objective="activation_l2")
    head = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)
    y = torch.full((2, 4, 3, 3), 3e38)  # finite, though its square is not
    # Computed, not skipped: a sum-based check would overflow and report NaN here.
    assert torch.isinf(head(None, y))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_window_pool_equals_the_adaptive_pool_when_windows_are_whole(rank):
    size = {1: (12,), 2: (8, 6), 3: (4, 6, 2)}[rank]
    out = {1: (3,), 2: (4, 3), 3: (2, 3, 1)}[rank]
    x = torch.randn(2, 5, *size)
    y = torch.randn(2, 7, *out)
    adaptive = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[rank](x, out)
    want = adaptive.flatten(2).transpose(1, 2)
    torch.testing.assert_close(input_tokens_on_output_grid(x, 1, y, 1), want)


def test_uneven_grids_still_use_the_adaptive_pool():
    x, y = torch.randn(2, 5, 7, 7), torch.randn(2, 3, 3, 3)
    want = F.adaptive_avg_pool2d(x, (3, 3)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(input_tokens_on_output_grid(x, 1, y, 1), want)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.out = nn.Linear(6, 6, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x):
        return self.out(self.embed(x) * self.scale).t().contiguous().t()


def test_fake_shape_pass_keeps_ties_shapes_and_leaves_real_tensors_alone():
    model = _Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = trace_model(model, ExampleInputs((torch.randn(3, 6),)))
    metas = propagate_shapes(traced.graph, traced.root, traced.inputs).metas
    out = [n for n in traced.graph.nodes if n.op == "output"][0].args[0]
    assert metas[out.name].shape == (3, 6)
    assert model.out.weight is model.embed.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and not type(v).__name__.startswith("Fake"), k


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("channel_first", [True, False])
def test_take_tokens_picks_the_same_values_and_gradients_in_either_layout(shared, channel_first):
    torch.manual_seed(1)
    if channel_first:
        maps = torch.randn(3, 5, 4, 4, requires_grad=True)
        tokens = to_tokens(maps, 1)  # a transposed view: tokens are the contiguous axis
        assert tokens.stride(1) == 1
    else:
        maps = torch.randn(3, 16, 5, requires_grad=True)
        tokens = to_tokens(maps, 2)
    index = torch.randperm(16)[:6] if shared else torch.rand(3, 16).argsort(dim=1)[:, :6]
    want = tokens[:, index] if shared else torch.stack([tokens[b, index[b]] for b in range(3)])
    got = take_tokens(tokens, index)
    assert torch.equal(got, want)
    weights = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * weights).sum(), maps)
    (g_want,) = torch.autograd.grad((want * weights).sum(), maps)
    assert torch.equal(g_got, g_want)


def test_under_torch_compile_norm_mse_is_the_plain_expression(monkeypatch):
    # The compiler fuses and differentiates the expression itself; the Function is for eager.
    prediction = torch.randn(2, 6, 5, requires_grad=True)
    target = torch.randn(2, 6, 5)
    assert "NormMSE" in type(norm_mse(prediction, target).grad_fn).__name__
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "NormMSE" not in type(norm_mse(prediction, target).grad_fn).__name__
