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


# --- rho_sim + norm_mse as one node (simfx.runtime.fused) ------------------------------------

from simfx.runtime import fused, heads  # noqa: E402
from simfx.runtime.objectives import RhoSim  # noqa: E402
from simfx.runtime.tokens import draw_index, put_tokens, sampled_input_tokens  # noqa: E402


def _tokens(batch, k, width, *, channel_first, dtype=torch.float64, grad=False):
    """Sampled tokens as the head passes them: a transposed view for channel-first maps."""
    t = torch.randn(batch, width, k, dtype=dtype).transpose(1, 2) if channel_first else torch.randn(
        batch, k, width, dtype=dtype)
    return t.requires_grad_(grad)


def _value_and_grads(loss, y_tokens, objective):
    return loss, torch.autograd.grad(loss, [y_tokens, *objective.parameters()])


@pytest.mark.parametrize("widths", [(8, 8), (8, 12), (12, 8)], ids=["same", "wider-out", "narrower-out"])
@pytest.mark.parametrize("rows", [(3, 5), (6, 50)], ids=["few-rows", "folded-rows"])  # B*k >= 2d folds Wp W3
@pytest.mark.parametrize("channel_first", [True, False])
def test_fused_rho_sim_equals_the_module_expression_in_value_and_gradient(widths, rows, channel_first):
    cin, cout = widths
    objective = RhoSim(cin, cout, dim=16).double()
    x = _tokens(*rows, cin, channel_first=channel_first)
    y = _tokens(*rows, cout, channel_first=channel_first, grad=True)
    fast = fused.rho_sim_norm_mse(objective, x, y)
    assert type(fast.grad_fn).__name__ == "_RhoSimNormMSEBackward"
    reference = objective(x, y)  # RhoSim.forward: the plain autograd expression
    got, want = _value_and_grads(3.5 * fast, y, objective), _value_and_grads(3.5 * reference, y, objective)
    _assert_same_loss_and_gradients(got, want)


def _assert_same_loss_and_gradients(got, want):
    # The loss maths runs in float32 in both (DESIGN step 6), so they agree to float32's
    # rounding of O(1) values (the last two biases' gradients are that rounding noise
    # alone: 0 in exact maths, see conftest).
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    for g, h in zip(got[1], want[1]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_fused_gradients_accumulate_over_repeated_backward_and_refuse_double_backward():
    objective = RhoSim(6, 6, dim=8).double()
    x, y = _tokens(2, 7, 6, channel_first=True), _tokens(2, 7, 6, channel_first=True, grad=True)
    loss = fused.rho_sim_norm_mse(objective, x, y)
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in objective.parameters()]
    (2 * loss).backward(retain_graph=True)
    for p, g in zip(objective.parameters(), once):
        torch.testing.assert_close(p.grad, 3 * g)
    (grad,) = torch.autograd.grad(loss, y, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_fused_path_without_gradients_gives_the_same_value():
    objective = RhoSim(6, 9, dim=8).double()
    x, y = _tokens(2, 7, 6, channel_first=False), _tokens(2, 7, 9, channel_first=False)
    with torch.no_grad():
        torch.testing.assert_close(fused.rho_sim_norm_mse(objective, x, y), objective(x, y), rtol=1e-6, atol=1e-7)


def _without_fast_path(monkeypatch):
    monkeypatch.setattr(heads, "rho_sim_norm_mse", lambda *args: None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("widths", [(4, 4), (4, 6)])
def test_fused_finite_check_gives_the_reference_nan_and_zero_gradients(bad, side, widths, monkeypatch):
    options = SimOptions(token_ratio=1.0)
    head = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=widths[0], out_width=widths[1])
    x, y = torch.randn(2, widths[0], 3, 3), torch.randn(2, widths[1], 3, 3)
    (x if side == "x" else y)[1, 2, 0, 1] = bad
    y.requires_grad_(True)
    loss = head(x, y)
    assert type(loss.grad_fn).__name__ == "_RhoSimNormMSEBackward" and torch.isnan(loss)
    loss.nan_to_num(0.0).backward()
    assert torch.equal(y.grad, torch.zeros_like(y))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in head.parameters())


def test_fused_path_steps_aside_where_it_would_compute_something_else():
    objective = RhoSim(6, 6, dim=8)
    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6, requires_grad=True)
    assert fused.rho_sim_norm_mse(objective, x, y) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts and cast cache: autograd's business
        assert fused.rho_sim_norm_mse(objective, x, y) is None
    assert fused.rho_sim_norm_mse(objective, x.double(), y) is None  # dtypes differ from the weights'
    assert fused.rho_sim_norm_mse(objective, x[:, :1], y[:, :1]) is None  # one token: norm_mse's special case
    handle = objective.proj[2].register_forward_hook(lambda *args: None)
    assert fused.rho_sim_norm_mse(objective, x, y) is None  # a hook must see its module run
    handle.remove()
    objective.proj[1] = nn.GELU()
    assert fused.rho_sim_norm_mse(objective, x, y) is None  # not the structure rho_sim builds
    assert fused.rho_sim_norm_mse(RhoSim(6, 6, dim=8, loss="mse"), x, y) is None


def test_fused_head_equals_the_reference_head_through_sampling_and_pooling(monkeypatch):
    # A strided block (x pooled onto y's grid, pre_proj) with the default sampling:
    # the same draw on both paths, the same loss and gradients.
    head = build_objective(SimOptions(), in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=8).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    y = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    fast = _value_and_grads(head(x, y), y, head)
    _without_fast_path(monkeypatch)
    torch.manual_seed(5)
    _assert_same_loss_and_gradients(fast, _value_and_grads(head(x, y), y, head))


def _compiled_graph_targets(head, x, y):
    """The compiled head's loss and gradients (``aot_eager``) and the targets its graphs call."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(head, backend=backend, fullgraph=True)
    got = _value_and_grads(compiled(x, y), y, head)
    return got, {n.target for g in graphs for n in g.graph.nodes}


def _calls(targets, operator):
    return operator in targets or operator.default in targets


# Each layout the block operator admits: channel-first maps (a strided block: x pooled
# onto y's grid, pre_proj), (B, N, C) tokens, NHWC maps, a channels_last tensor, kept
# channels narrowed (channel_ratio), and 1-d maps.
_BLOCK_LAYOUTS = {
    "nchw-strided": ((3, 4, 8, 8), (3, 6, 4, 4), 1, {}),
    "tokens": ((3, 9, 5), (3, 9, 5), 2, {}),
    "nhwc": ((3, 4, 4, 5), (3, 2, 2, 7), 3, {}),
    "channels-last": ((2, 6, 4, 4), (2, 6, 4, 4), 1, {"channels_last": True}),
    "narrowed": ((2, 8, 4, 4), (2, 8, 4, 4), 1, {"channel_ratio": 0.5}),
    "1d": ((2, 5, 10), (2, 6, 10), 1, {}),
}


@pytest.mark.parametrize("layout", sorted(_BLOCK_LAYOUTS))
@pytest.mark.parametrize("strategy", ["shared", "per_sample", "topk_mean"])
@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_compiled_cpu_graph_runs_each_block_as_one_operator_with_eager_values(layout, strategy, ratio, monkeypatch):
    # aot_eager runs the operator eagerly, so it draws from the same generator as eager
    # mode: with the same seed, the same tokens, loss and gradients as the reference.
    x_shape, y_shape, channel_dim, extra = _BLOCK_LAYOUTS[layout]
    extra = dict(extra)
    channels_last = extra.pop("channels_last", False)
    options = SimOptions(token_ratio=ratio, token_sampling=strategy, **extra)
    head = build_objective(options, in_channel_dim=channel_dim, out_channel_dim=channel_dim,
                           in_width=x_shape[channel_dim], out_width=y_shape[channel_dim]).double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randn(*y_shape, dtype=torch.float64)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    torch.manual_seed(7)
    got, targets = _compiled_graph_targets(head, x, y)
    assert _calls(targets, torch.ops.simfx.rho_sim_block)
    _without_fast_path(monkeypatch)
    torch.manual_seed(7)
    _assert_same_loss_and_gradients(got, _value_and_grads(head(x, y), y, head))


def test_compiled_block_operator_gives_the_reference_nan_and_zero_gradients():
    head = build_objective(SimOptions(), in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)
    x, y = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    y[0, 1] = float("nan")  # a whole channel: whichever tokens the draw picks
    y.requires_grad_(True)
    (loss, grads), targets = _compiled_graph_targets(head, x, y)
    assert _calls(targets, torch.ops.simfx.rho_sim_block) and torch.isnan(loss)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_compiled_vectors_keep_the_loss_operator_and_equal_eager():
    # (B, C) outputs: the batch is the token axis, so the block operator steps aside
    # and the compiled graph samples around the loss operator.
    head = build_objective(SimOptions(token_ratio=1.0), in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=6)
    x, y = torch.randn(5, 4), torch.randn(5, 6, requires_grad=True)
    eager = _value_and_grads(head(x, y), y, head)
    got, targets = _compiled_graph_targets(head, x, y)
    assert _calls(targets, torch.ops.simfx.rho_sim_norm_mse) and not _calls(targets, torch.ops.simfx.rho_sim_block)
    torch.testing.assert_close(got[0], eager[0])
    for g, h in zip(got[1], eager[1]):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("widths", [(5, 5), (5, 7)])
def test_custom_operator_registration_passes_opcheck(widths):
    cin, cout = widths
    objective = RhoSim(cin, cout, dim=8)
    x, y = torch.randn(2, 4, cin), torch.randn(2, 4, cout, requires_grad=True)
    layers = fused._layers(objective, x, y)
    torch.library.opcheck(torch.ops.simfx.rho_sim_norm_mse.default, (y, x, *layers))


@pytest.mark.parametrize("strategy", ["shared", "per_sample", "topk_mean"])
@pytest.mark.parametrize("ratio", [(1, 5), (1, 1)])
@pytest.mark.parametrize("widths", [(4, 4), (4, 6)])
def test_block_operator_registration_passes_opcheck(strategy, ratio, widths):
    cin, cout = widths
    head = build_objective(SimOptions(), in_channel_dim=1, out_channel_dim=1, in_width=cin, out_width=cout)
    x, y = torch.randn(2, cin, 8, 8), torch.randn(2, cout, 4, 4, requires_grad=True)
    layers = fused._layers(head.objective, x, y)
    torch.library.opcheck(torch.ops.simfx.rho_sim_block.default,
                          (x, y, *layers, 1, 1, cin, cout, *ratio, 2, strategy))


def _strided_like(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout (same shape)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # a permuted, dense buffer: H and W swapped in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "padded":  # not dense: every other column of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "padded"])
@pytest.mark.parametrize("strategy", ["shared", "per_sample"])
@pytest.mark.parametrize("widths", [(4, 4), (4, 6)])
def test_block_operator_gives_the_same_loss_and_gradients_in_any_memory_layout(layout, strategy, widths):
    # The operator is registered with a flexible layout: inductor hands it maps in the
    # layout it chose for them (channels_last for a CNN on a CPU) rather than copying
    # them into the strides seen when tracing. Its values must not depend on the strides.
    cin, cout = widths
    head = build_objective(SimOptions(), in_channel_dim=1, out_channel_dim=1, in_width=cin, out_width=cout).double()
    layers = fused._layers(head.objective, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    y = torch.randn(2, cout, 4, 4, dtype=torch.float64)

    def loss_and_grads(x, y):
        y = y.detach().requires_grad_(True)
        torch.manual_seed(3)
        loss = torch.ops.simfx.rho_sim_block(x, y, *layers, 1, 1, cin, cout, 1, 5, 2, strategy)[0]
        params = [t for t in layers if t is not None]
        return loss.detach(), torch.autograd.grad(loss, [y, *params])

    want_loss, want_grads = loss_and_grads(x, y)
    got_loss, got_grads = loss_and_grads(_strided_like(x, layout), _strided_like(y, layout))
    assert torch.equal(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# --- sampling shortcuts (simfx.runtime.tokens) ----------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["shared", "per_sample"])
def test_sampled_windows_equal_pooling_the_whole_map_then_sampling(rank, strategy):
    size = {1: (12,), 2: (8, 6), 3: (4, 6, 2)}[rank]
    out = {1: (3,), 2: (4, 3), 3: (2, 3, 1)}[rank]
    x, y = torch.randn(3, 5, *size), torch.randn(3, 7, *out)
    n = y[0, 0].numel()
    index = draw_index(n, 2, 3, strategy, y.device)
    want = take_tokens(input_tokens_on_output_grid(x, 1, y, 1), index)
    torch.testing.assert_close(sampled_input_tokens(x, 1, y, 1, index), want)
    # Channels last (NHWC) on both sides, as torchvision's Swin has them.
    x_last, y_last = x.movedim(1, -1), y.movedim(1, -1)
    torch.testing.assert_close(sampled_input_tokens(x_last, rank + 1, y_last, rank + 1, index), want)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "tokens", "narrowed", "all-tokens"])
def test_put_tokens_writes_the_gradient_autograd_gives_the_map(shared, layout):
    maps = torch.randn(2, 6, 4, 4)
    if layout == "channels-last":
        maps = maps.contiguous(memory_format=torch.channels_last)
    channel_dim, channels = (2, 6) if layout == "tokens" else (1, 3 if layout == "narrowed" else 6)
    if layout == "tokens":
        maps = maps.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
    maps.requires_grad_(True)
    tokens = to_tokens(maps.narrow(channel_dim, 0, channels), channel_dim)
    n = tokens.shape[1]
    index = None if layout == "all-tokens" else draw_index(n, 5, 2, "shared" if shared else "per_sample", maps.device)
    picked = tokens if index is None else take_tokens(tokens, index)
    values = torch.randn_like(picked)
    (want,) = torch.autograd.grad(picked, maps, values)
    got = torch.zeros_like(maps)
    put_tokens(to_tokens(got.narrow(channel_dim, 0, channels), channel_dim), index, values)
    assert torch.equal(got, want)


def test_take_tokens_on_large_maps_uses_the_matrix_selection_with_the_same_values_and_gradients():
    maps = torch.randn(2, 3, 8, 8, requires_grad=True)
    tokens = to_tokens(maps, 1)
    index = torch.randperm(64)[:6]
    got = take_tokens(tokens, index)
    want = tokens[:, index]
    assert torch.equal(got, want)
    weights = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * weights).sum(), maps)
    (g_want,) = torch.autograd.grad((want * weights).sum(), maps)
    assert torch.equal(g_got, g_want)
