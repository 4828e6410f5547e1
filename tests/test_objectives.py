"""The rho_sim maths against an independent computation written from DESIGN.md steps 1-7."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_reconstructor_gradients
from simfx.runtime.heads import build_objective
from simfx.runtime.monitor import weighted_mean_of_finite as aggregate_losses
from simfx.runtime.objectives import get_objective, register_objective, objective_names
from simfx.options import SimOptions

LOSSES = ["norm_mse", "mse", "cos", "smooth_l1", "kl"]
SAMPLING = ["shared", "per_sample", "topk_mean"]


# --- the reference, written out from DESIGN.md -------------------------------------


def ref_tokens(t, channel_dim):
    """Step 1: NCHW -> (B, HW, C); (B, N, C) stays; (B, C) -> (1, B, C)."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if channel_dim == 1 and t.dim() == 4:
        b, c, h, w = t.shape
        return t.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return t


def ref_indices(strategy, x_tok, n, k, batch):
    """Step 4, with the random-number contract documented in simfx.runtime.tokens."""
    if k >= n:
        return None
    if strategy == "shared":
        return torch.rand(n).argsort()[:k]
    order = torch.rand(batch, n).argsort(dim=1)
    if strategy == "per_sample":
        return order[:, :k]
    candidates = order[:, : min(3 * k, n)]
    score = torch.stack([x_tok[i, candidates[i]].mean(dim=-1) for i in range(batch)])
    top = score.topk(k, dim=1).indices
    return torch.stack([candidates[i, top[i]] for i in range(batch)])


def ref_take(tok, index):
    if index is None:
        return tok
    if index.dim() == 1:
        return tok[:, index]
    return torch.stack([tok[i, index[i]] for i in range(tok.shape[0])])


def ref_mlp(layers, v):
    """proj = Linear -> ReLU -> Linear -> ReLU -> Linear."""
    l1, l2, l3 = layers
    v = torch.relu(v @ l1.weight.T + l1.bias)
    v = torch.relu(v @ l2.weight.T + l2.bias)
    return v @ l3.weight.T + l3.bias


def ref_loss(kind, zy, zx):
    """Step 6, computed in float32 and float64-checked by the caller."""
    if kind == "norm_mse":
        def standardise(z):
            mean = z.mean(dim=1, keepdim=True)
            std = torch.sqrt(((z - mean) ** 2).sum(dim=1, keepdim=True) / (z.shape[1] - 1))
            return (z - mean) / (std + 1e-6)
        return torch.sqrt(((standardise(zy) - standardise(zx)) ** 2).sum(dim=-1)).mean()
    if kind == "mse":
        return ((zy - zx) ** 2).mean()
    if kind == "cos":
        cos = (zy * zx).sum(-1) / (zy.norm(dim=-1).clamp_min(1e-8) * zx.norm(dim=-1).clamp_min(1e-8))
        return (2 - 2 * cos).mean()
    if kind == "smooth_l1":
        d = (zy - zx).abs()
        return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    if kind == "kl":
        p = torch.softmax(zx, dim=-1)
        return (p * (torch.log(p) - torch.log_softmax(zy, dim=-1))).sum() / zy.shape[0]
    raise AssertionError(kind)


def reference_rho_sim(module, x, y, options, seed):
    """An independent rho_sim loss for one conv boundary (NCHW in and out)."""
    head = module.objective
    x_tok = ref_tokens(x, 1)
    if x.shape[2:] != y.shape[2:]:
        pooled = F.adaptive_avg_pool2d(x, y.shape[2:])  # step 2
        x_tok = ref_tokens(pooled, 1)
    y_tok = ref_tokens(y, 1)
    cin = max(1, math.floor(options.channel_ratio * x.shape[1]))  # step 3, each side by its own C
    cout = max(1, math.floor(options.channel_ratio * y.shape[1]))
    x_tok, y_tok = x_tok[..., :cin], y_tok[..., :cout]
    n = y_tok.shape[1]
    k = min(n, max(2, math.floor(options.token_ratio * n)))
    torch.manual_seed(seed)
    index = ref_indices(options.token_sampling, x_tok, n, k, y.shape[0])
    xs, ys = ref_take(x_tok, index), ref_take(y_tok, index)
    proj = [head.proj[0], head.proj[2], head.proj[4]]
    zx = ref_mlp(proj, xs)  # step 5: target
    pre = ys @ head.pre_proj.weight.T if cin != cout else ys
    zy = ref_mlp(proj, pre) @ head.predictor.weight.T + head.predictor.bias
    return ref_loss(options.loss, zy.float(), zx.float())


def make_head(x, y, options):
    return build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=x.shape[1], out_width=y.shape[1])


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_rho_sim_matches_reference(loss, sampling):
    options = SimOptions(loss=loss, token_sampling=sampling, token_ratio=0.25)
    x, y = torch.randn(3, 6, 8, 8), torch.randn(3, 6, 8, 8)
    head = make_head(x, y, options)
    torch.manual_seed(7)
    got = head(x, y)
    want = reference_rho_sim(head, x, y, options, seed=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_all_tokens_order_does_not_matter(loss):
    """token_ratio=1.0 uses every token; the loss equals the unsampled reference."""
    options = SimOptions(loss=loss, token_ratio=1.0)
    x, y = torch.randn(2, 5, 4, 4), torch.randn(2, 7, 4, 4)
    head = make_head(x, y, options)
    got = head(x, y)
    want = reference_rho_sim(head, x, y, options, seed=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_strided_channel_changing_block_pools_input_onto_output_grid(sampling):
    options = SimOptions(token_sampling=sampling, channel_ratio=0.5)
    x, y = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    head = make_head(x, y, options)
    assert head.objective.pre_proj.weight.shape == (4, 8)  # C_out kept -> C_in kept
    torch.manual_seed(3)
    got = head(x, y)
    want = reference_rho_sim(head, x, y, options, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sample_count_uses_floor_with_a_floor_of_two():
    options = SimOptions(token_ratio=0.2)
    x = y = torch.randn(2, 4, 3, 3)  # N = 9 -> floor(1.8) = 1 -> 2
    head = make_head(x, y, options)
    seen = []
    head.objective.register_forward_hook(lambda m, args, out: seen.append(args[1].shape))
    head(x, y)
    assert seen == [torch.Size([2, 2, 4])]


def test_target_branch_gets_no_gradient():
    options = SimOptions(token_ratio=1.0)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y = torch.randn(2, 4, 4, 4, requires_grad=True)
    head = make_head(x, y, options)
    loss = head(x, y)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y), allow_unused=True, retain_graph=True)
    assert grad_x is None
    assert grad_y is not None and grad_y.abs().sum() > 0
    # The shared projector learns only from the prediction side: its gradient equals
    # the one obtained with a constant target.
    loss.backward()
    with_sim = [p.grad.clone() for p in head.objective.proj.parameters()]
    head.zero_grad()
    zx = head.objective.proj(ref_tokens(x.detach(), 1)).detach()
    zy = head.objective.predictor(head.objective.proj(ref_tokens(y, 1)))
    ref_loss("norm_mse", zy, zx).backward()
    for got, want in zip(with_sim, (p.grad for p in head.objective.proj.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_every_reconstructor_parameter_gets_a_gradient():
    options = SimOptions()
    x, y = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3, requires_grad=True)
    head = make_head(x, y, options)
    head(x, y).backward()
    assert_reconstructor_gradients(head.named_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_maths_in_float32_for_low_precision_activations(dtype):
    x, y = torch.randn(2, 4, 4, 4, dtype=dtype), torch.randn(2, 4, 4, 4, dtype=dtype)
    head = make_head(x, y, SimOptions()).to(dtype)
    loss = head(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_layouts_bnc_and_bc_and_nhwc():
    options = SimOptions(token_ratio=1.0)
    # (B, N, C) tokens stay as they are.
    x, y = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    head = build_objective(options, in_channel_dim=2, out_channel_dim=2, in_width=6, out_width=6)
    zx = head.objective.proj(x)
    zy = head.objective.predictor(head.objective.proj(y))
    torch.testing.assert_close(head(x, y), ref_loss("norm_mse", zy, zx))
    # (B, C) is one sequence of B tokens.
    x2, y2 = torch.randn(4, 6), torch.randn(4, 6)
    zx = head.objective.proj(x2.unsqueeze(0))
    zy = head.objective.predictor(head.objective.proj(y2.unsqueeze(0)))
    head2 = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=6, out_width=6)
    head2.load_state_dict(head.state_dict())
    torch.testing.assert_close(head2(x2, y2), ref_loss("norm_mse", zy, zx))
    # NHWC (torchvision Swin) equals the NCHW computation on the permuted tensors.
    x3, y3 = torch.randn(2, 4, 4, 6), torch.randn(2, 4, 4, 6)
    nhwc = build_objective(options, in_channel_dim=3, out_channel_dim=3, in_width=6, out_width=6)
    nchw = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=6, out_width=6)
    nchw.load_state_dict(nhwc.state_dict())
    torch.testing.assert_close(nhwc(x3, y3), nchw(x3.permute(0, 3, 1, 2), y3.permute(0, 3, 1, 2)))


def test_patch_merging_nhwc_pools_on_the_grid():
    options = SimOptions(token_ratio=1.0)
    x, y = torch.randn(2, 8, 8, 4), torch.randn(2, 4, 4, 8)
    nhwc = build_objective(options, in_channel_dim=3, out_channel_dim=3, in_width=4, out_width=8)
    nchw = build_objective(options, in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=8)
    nchw.load_state_dict(nhwc.state_dict())
    torch.testing.assert_close(nhwc(x, y), nchw(x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)))


def test_non_finite_block_is_nan_without_nan_gradients():
    options = SimOptions()
    x = torch.randn(2, 4, 4, 4)
    y = torch.randn(2, 4, 4, 4)
    y[0, 0, 0, 0] = float("nan")
    y.requires_grad_(True)
    head = make_head(x, y, options)
    options_all = SimOptions(token_ratio=1.0)
    head_all = make_head(x, y, options_all)
    loss = head_all(x, y)
    assert torch.isnan(loss)
    total = aggregate_losses([loss, head(x, torch.randn(2, 4, 4, 4))], [1.0, 1.0])
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(y.grad).all()
    for p in head_all.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_single_token_norm_mse_is_a_zero_that_reaches_every_parameter():
    # One token (a 1x1 map, or a (B, C) block at batch 1): the standardisation is
    # undefined, so the block gives 0, never NaN, and every reconstructor
    # parameter still gets a (zero) gradient, as DDP requires.
    options = SimOptions()
    x, y = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1, requires_grad=True)
    head = make_head(x, y, options)
    loss = head(x, y)
    assert loss.item() == 0.0 and loss.requires_grad
    total = aggregate_losses([loss, torch.tensor(2.0, requires_grad=True)], [0.5, 0.5])
    assert total.item() == pytest.approx(0.5)
    total.backward()
    assert torch.isfinite(y.grad).all()
    for p in head.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_aggregate_is_beta_times_mean_of_finite_losses():
    losses = [torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(3.0), torch.tensor(float("nan"))]
    assert aggregate_losses(losses, [5e-3] * 4).item() == pytest.approx(5e-3 * 2.0)
    assert aggregate_losses(losses, [1.0, 1.0, 2.0, 1.0]).item() == pytest.approx((1.0 + 6.0) / 2)
    assert aggregate_losses([torch.tensor(float("nan"))], [1.0]).item() == 0.0


_AGGREGATE_WEIGHTS = pytest.mark.parametrize("weights", [[5e-3] * 4, [1.0, 1.0, 2.0, 1.0]], ids=["same", "mixed"])
_AGGREGATE_VALUES = pytest.mark.parametrize(
    "values", [[1.0, float("inf"), 3.0, float("nan")], [float("nan")] * 4, [1.0, 2.0, 3.0, 4.0]])


def _aggregate_and_grads(aggregate, values, weights):
    """The aggregate of scalar losses ``values`` and each loss's gradient."""
    losses = [torch.tensor(v, requires_grad=True) for v in values]
    total = aggregate(losses, weights)
    total.backward()
    return total.detach(), [loss.grad for loss in losses]


@_AGGREGATE_WEIGHTS
@_AGGREGATE_VALUES
def test_compiled_aggregate_equals_eager_in_value_and_gradient(weights, values):
    # Compiled on a CPU, the aggregate is one operator running the eager maths, with the
    # gradient autograd gives the eager expression: equal to the bit.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(aggregate_losses, backend=backend, fullgraph=True)
    got, got_grads = _aggregate_and_grads(compiled, values, weights)
    want, want_grads = _aggregate_and_grads(aggregate_losses, values, weights)
    targets = {n.target for g in graphs for n in g.graph.nodes}
    assert torch.ops.simfx.weighted_mean_of_finite in targets  # dynamo records the packet
    assert torch.equal(got, want)
    assert all(torch.equal(g, h) for g, h in zip(got_grads, want_grads))


@_AGGREGATE_WEIGHTS
@_AGGREGATE_VALUES
def test_unstacked_aggregate_equals_eager_in_value_and_gradient(weights, values):
    # The form compiled on a GPU (on a CPU the compiled aggregate is an operator,
    # checked above): the same maths one scalar at a time.
    from simfx.runtime.monitor import _weighted_mean_unstacked

    got, got_grads = _aggregate_and_grads(_weighted_mean_unstacked, values, weights)
    want, want_grads = _aggregate_and_grads(aggregate_losses, values, weights)
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)


def test_builtin_objectives_and_registry():
    assert {"rho_sim", "self_model", "activation_l2"} <= set(objective_names())
    y = torch.randn(2, 6, 3, 3, requires_grad=True)
    x = torch.randn(2, 6, 3, 3)
    l2 = build_objective(SimOptions(objective="activation_l2", token_ratio=1.0),
                         in_channel_dim=1, out_channel_dim=1, in_width=6, out_width=6)
    torch.testing.assert_close(l2(x, y), ref_tokens(y, 1).pow(2).sum(-1).mean())
    sm = build_objective(SimOptions(objective="self_model", token_ratio=1.0),
                         in_channel_dim=1, out_channel_dim=1, in_width=6, out_width=6)
    a = ref_tokens(y, 1)
    want = (sm.objective.linear(a) - a.detach()).pow(2).sum(-1).mean()
    torch.testing.assert_close(sm(x, y), want)
    with pytest.raises(ValueError, match="unknown objective 'nope'.*register_objective"):
        get_objective("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_objective("rho_sim", lambda cin, cout, o: None)


def test_options_validation_messages():
    with pytest.raises(ValueError, match=r"token_ratio must be in \(0, 1\]"):
        SimOptions(token_ratio=0)
    with pytest.raises(ValueError, match="token_sampling='v0' is not one of"):
        SimOptions(token_sampling="v0")
    with pytest.raises(ValueError, match="loss='l1' is not one of"):
        SimOptions(loss="l1")
    with pytest.raises(TypeError, match=r"unknown SIM option\(s\) \['ratio'\]"):
        SimOptions().replace(ratio=0.5)
