"""simfx.compat: the SIM-pytorch decorator API on simfx's objectives.

Every block class here is a plain class plus a decorated subclass made by
:func:`decorated`, so the decorated and undecorated models share one body and
can be compared with ``simfx.transform(plain, x, blocks=[Plain])``.
"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
import torch._dynamo as dynamo
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import simfx
from conftest import assert_reconstructor_gradients
from simfx.analysis.layout import Layout
from simfx.compat import LossSimTracker, compute_loss_sim, forward_with_sim_cache, init_proj
from simfx.runtime.objectives import RhoSim, SelfModel


# --- blocks and models -------------------------------------------------------------


class PlainConv(nn.Module):
    """Conv block that may downsample and widen (the reference crashes on both)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.poison = False  # set True to make this block's output NaN

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y * float("nan") if self.poison else y


class PlainMlp(nn.Module):
    """Pre-norm residual MLP on (B, N, C) or (B, C) tokens."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Scale(nn.Module):
    """No weight layer: the channel axis can only come from shapes or sim_cfg."""

    def forward(self, x):
        return 2 * x


def decorated(base, *dims, **settings):
    """``base`` with init_proj(*dims, **settings) and forward_with_sim_cache on top."""

    class Decorated(base):
        @init_proj(*dims, **settings)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

        @forward_with_sim_cache()
        def forward(self, x):
            return super().forward(x)

    Decorated.__name__ = Decorated.__qualname__ = f"Sim{base.__name__}"
    return Decorated


SimPlainConv = decorated(PlainConv, "in_channels", "out_channels")  # module level, so it pickles


class ConvNet(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(block(4, 4), block(4, 8, stride=2), block(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TokenNet(nn.Module):
    def __init__(self, block, width=8):
        super().__init__()
        self.blocks = nn.Sequential(block(width), block(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def conv_pair(**settings):
    """The same ConvNet twice, undecorated and decorated, with equal block weights."""
    plain = ConvNet(PlainConv)
    sim_model = ConvNet(decorated(PlainConv, "in_channels", "out_channels", **settings))
    missing, unexpected = sim_model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".simfx." in k for k in missing)
    return plain, sim_model


def spy_tokens(monkeypatch, block):
    """Record the (x_tokens, y_tokens) the block's objective receives."""
    seen = []
    objective = block.simfx.objective
    original = type(objective).forward

    def spy(x_tokens, y_tokens):
        seen.append((x_tokens, y_tokens))
        return original(objective, x_tokens, y_tokens)

    monkeypatch.setattr(objective, "forward", spy)
    return seen


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


# --- the import line and the reconstructor ------------------------------------------


def test_the_four_names_import_from_simfx_compat():
    import simfx.compat as compat

    assert {"init_proj", "forward_with_sim_cache", "compute_loss_sim", "LossSimTracker"} <= set(compat.__all__)
    assert simfx.compat is compat


def test_reconstructor_exists_after_init_and_is_saved_and_optimised():
    _, model = conv_pair()
    widening = model.blocks[1]
    assert isinstance(widening.simfx.objective, RhoSim)
    assert isinstance(widening.simfx.objective.pre_proj, nn.Linear)  # 8 -> 4 channels
    assert isinstance(model.blocks[0].simfx.objective.pre_proj, nn.Identity)
    keys = model.state_dict().keys()
    assert "blocks.1.simfx.objective.pre_proj.weight" in keys
    assert "blocks.1.simfx.objective.proj.0.weight" in keys
    optimised = {id(p) for p in torch.optim.SGD(model.parameters(), lr=0.1).param_groups[0]["params"]}
    assert all(id(p) in optimised for p in widening.simfx.parameters())
    assert widening.loss_sim is None  # nothing cached before the first forward


def test_every_reconstructor_parameter_gets_a_gradient_and_the_target_none(monkeypatch):
    _, model = conv_pair()
    seen = spy_tokens(monkeypatch, model.blocks[0])
    model(torch.randn(2, 3, 8, 8)).sum().mul(0).add(compute_loss_sim(model)).backward()
    assert_reconstructor_gradients((n, p) for n, p in model.named_parameters() if ".simfx." in n)
    x_tokens, y_tokens = seen[0]
    assert not x_tokens.requires_grad and y_tokens.requires_grad
    assert model.blocks[0].conv.weight.grad.abs().sum() > 0  # the block learns through y


# --- the arguments ---------------------------------------------------------------------


def test_widths_by_attribute_name_by_int_and_output_defaulting_to_input():
    by_int = decorated(PlainConv, 4, 8)(4, 8)
    assert isinstance(by_int.simfx.objective.pre_proj, nn.Linear)
    same = decorated(PlainMlp, "width")(6)
    assert isinstance(same.simfx.objective.pre_proj, nn.Identity)
    assert same.simfx.objective.proj[0].in_features == 6


def test_ratios_and_sampling_types_reach_the_objective(monkeypatch):
    block = decorated(PlainConv, "in_channels", "out_channels", token_sampling_ratio=0.25,
                      channel_sampling_ratio=0.5)(4, 8)
    seen = spy_tokens(monkeypatch, block)
    block(torch.randn(3, 4, 8, 8))
    x_tokens, y_tokens = seen[0]
    assert x_tokens.shape == (3, 16, 2) and y_tokens.shape == (3, 16, 4)  # 64 tokens * 0.25; C * 0.5 per side


def _index_tokens(monkeypatch, sampling, n=12, ratio=1 / 3, batch=4):
    """Run an identity block on tokens whose value is their index; return the sampled indices."""
    block = decorated(PlainMlp, "width", token_sampling_type=sampling, token_sampling_ratio=ratio)(2)
    seen = spy_tokens(monkeypatch, block)
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(batch, n, 2).contiguous()
    block(x)
    return seen[0][0][..., 0].long()


def test_token_sampling_type_v0_v1_v2(monkeypatch):
    v0 = _index_tokens(monkeypatch, "v0")
    assert v0.shape == (4, 4) and (v0 == v0[0]).all()  # one draw for the batch
    v1 = _index_tokens(monkeypatch, "v1")
    assert not all((v1[i].sort().values == v1[0].sort().values).all() for i in range(1, 4))  # a draw per sample
    v2 = _index_tokens(monkeypatch, "v2")  # 3k = N candidates: the k largest mean activations win
    assert (v2.sort(dim=1).values == torch.tensor([8, 9, 10, 11])).all()
    assert _index_tokens(monkeypatch, "per_sample").shape == (4, 4)  # simfx's own names work too


@pytest.mark.parametrize("loss_type", ["norm_mse", "mse", "cos", "smooth_l1", "kl"])
def test_loss_type_reaches_the_objective(loss_type):
    block = decorated(PlainMlp, "width", loss_type=loss_type)(4)
    assert block.simfx.objective.loss == loss_type
    block(torch.randn(2, 12, 4))
    assert torch.isfinite(block.loss_sim)


def test_proj_type_picks_the_objective():
    assert isinstance(decorated(PlainMlp, "width", proj_type="InvSS")(4).simfx.objective, RhoSim)
    block = decorated(PlainMlp, "width", proj_type="self_model")(4)
    assert isinstance(block.simfx.objective, SelfModel)
    block(torch.randn(2, 5, 4))
    assert torch.isfinite(compute_loss_sim(block))


def test_sim_cfg_overrides_the_arguments_and_sets_beta_and_dim():
    settings = dict(token_sampling_ratio=0.2, loss_type="norm_mse", token_sampling_type="v0")
    base = decorated(PlainMlp, "width", **settings)(4)
    cfg = {"loss_beta": 0.1, "token_sampling_ratio": 1.0, "loss_type": "mse", "token_sampling_type": "v1",
           "channel_sampling_ratio": 0.5, "dim": 16}
    tuned = decorated(PlainMlp, "width", **settings, sim_cfg=cfg)(4)
    options = tuned._simfx_compat.options
    assert (options.beta, options.token_ratio, options.loss, options.token_sampling, options.channel_ratio) == (
        0.1, 1.0, "mse", "per_sample", 0.5)
    assert tuned.simfx.objective.predictor.in_features == 16
    assert tuned.simfx.objective.proj[0].in_features == 2
    assert base._simfx_compat.options.beta == 5e-3  # the reference's loss_beta


def test_loss_beta_scales_the_cached_loss():
    torch.manual_seed(1)
    a = decorated(PlainMlp, "width", token_sampling_ratio=1.0)(4)
    b = decorated(PlainMlp, "width", token_sampling_ratio=1.0, sim_cfg={"loss_beta": 0.1})(4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 4)
    a(x), b(x)
    assert torch.allclose(b.loss_sim, a.loss_sim * 20)


def test_channel_dim_from_the_weight_layer_or_sim_cfg(monkeypatch):
    nhwc = decorated(PlainMlp, "width", token_sampling_ratio=1.0)(4)  # Linear/LayerNorm: channels last
    seen = spy_tokens(monkeypatch, nhwc)
    x = torch.randn(2, 4, 4, 4)
    nhwc(x)
    assert torch.equal(seen[0][0], x.flatten(1, 2))

    forced = decorated(Scale, 4, token_sampling_ratio=1.0, sim_cfg={"channel_dim": 3})()
    seen = spy_tokens(monkeypatch, forced)
    forced(x)
    assert torch.equal(seen[0][0], x.flatten(1, 2))
    guessed = decorated(Scale, 4, token_sampling_ratio=1.0)()  # no weight layer, 4-D: NCHW as the reference
    seen = spy_tokens(monkeypatch, guessed)
    guessed(x)
    assert torch.equal(seen[0][0], x.flatten(2).transpose(1, 2))


def test_a_2d_activation_is_one_sequence_of_batch_tokens(monkeypatch):
    block = decorated(PlainMlp, "width", token_sampling_ratio=1.0)(4)
    seen = spy_tokens(monkeypatch, block)
    block(torch.randn(6, 4))
    assert seen[0][1].shape == (1, 6, 4) and torch.isfinite(block.loss_sim)


def test_nested_decorated_blocks_each_get_a_loss_and_keep_their_own_layout():
    class Stage(nn.Module):
        @init_proj(8)
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(SimPlainConv(8, 8), SimPlainConv(8, 8))

        @forward_with_sim_cache()
        def forward(self, x):
            return self.inner(x)

    stage = Stage()
    assert stage._simfx_compat.hints == (Layout.CHANNELS_FIRST, Layout.CHANNELS_FIRST)  # not the inner reconstructors' Linear layers
    stage(torch.randn(2, 8, 4, 4))
    losses = [stage.loss_sim] + [b.loss_sim for b in stage.inner]
    torch.testing.assert_close(compute_loss_sim(stage), torch.stack(losses).mean())


# --- the fixes ---------------------------------------------------------------------------


def test_blocks_that_change_resolution_work():
    _, model = conv_pair()
    model(torch.randn(2, 3, 8, 8))  # blocks[1] halves H and W and doubles C
    assert torch.isfinite(model.blocks[1].loss_sim) and model.blocks[1].loss_sim > 0

    class HalveTokens(PlainMlp):
        def forward(self, x):
            return super().forward(x)[:, ::2]

    block = decorated(HalveTokens, "width")(4)
    assert block(torch.randn(2, 16, 4)).shape == (2, 8, 4)
    assert compute_loss_sim(block) > 0


def test_zero_token_ratio_keeps_the_forward_and_contributes_nothing():
    torch.manual_seed(2)
    off = decorated(PlainMlp, "width", token_sampling_ratio=0)(4)
    assert not hasattr(off, "simfx")  # no reconstructor: nothing for the optimizer or DDP to wait on
    x = torch.randn(2, 5, 4)
    out = off(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape  # the reference returns None here
    zero = compute_loss_sim(off)
    assert zero.item() == 0.0

    on = decorated(PlainMlp, "width")(4)
    mixed = nn.Sequential(on, off)
    mixed(x)
    alone = on.loss_sim
    assert torch.equal(compute_loss_sim(mixed), alone)  # the off block does not dilute the mean
    disabled = decorated(PlainMlp, "width", sim_cfg={"token_sampling_ratio": 0.0})(4)
    assert not hasattr(disabled, "simfx")


def test_construction_logs_instead_of_printing(capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="simfx.compat"):
        decorated(PlainConv, "in_channels", "out_channels")(4, 8)
    assert capsys.readouterr().out == ""
    assert any("SimPlainConv" in r.getMessage() and r.name == "simfx.compat" for r in caplog.records)


def test_non_finite_block_losses_are_skipped_without_host_sync(monkeypatch):
    _, model = conv_pair()
    model.blocks[1].poison = True  # its output, and the next block's input, are NaN
    model(torch.randn(2, 3, 8, 8))
    losses = [b.loss_sim for b in model.blocks]
    assert torch.isnan(losses[1]) and torch.isnan(losses[2]) and torch.isfinite(losses[0])

    def sync(*args, **kwargs):
        raise AssertionError("compute_loss_sim synchronised with the device")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    total = compute_loss_sim(model)
    monkeypatch.undo()
    assert torch.equal(total, losses[0])  # the finite one counts alone


def test_a_loss_is_returned_once_and_eval_computes_nothing(monkeypatch):
    _, model = conv_pair()
    tracker = LossSimTracker(model)
    model(torch.randn(2, 3, 8, 8))
    assert tracker.compute_loss_sim() > 0
    assert tracker.compute_loss_sim().item() == 0.0  # already collected
    model(torch.randn(2, 3, 8, 8))
    seen = spy_tokens(monkeypatch, model.blocks[0])
    model.eval()
    model(torch.randn(2, 3, 8, 8))  # a validation pass drops the unread training losses
    assert seen == [] and all(b.loss_sim is None for b in model.blocks)
    assert compute_loss_sim(model).item() == 0.0


def _compiled_equals_eager(compiled_step, model, x):
    torch.manual_seed(3)
    eager = model(x).sum() + compute_loss_sim(model)
    torch.manual_seed(3)
    assert torch.allclose(compiled_step(x), eager, rtol=1e-4, atol=1e-6)


def test_decorated_model_compiles_fullgraph_without_recompiles():
    _, model = conv_pair(token_sampling_ratio=0.5)
    backend = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    _compiled_equals_eager(lambda x: compiled(x).sum() + compute_loss_sim(model), model, torch.randn(2, 3, 8, 8))
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            (compiled(torch.randn(2, 3, 8, 8)).sum() + compute_loss_sim(model)).backward()
    assert backend.frame_count == 1


def test_a_whole_step_with_the_tracker_compiles_as_one_graph():
    _, model = conv_pair(token_sampling_type="v2")
    model.blocks[1].poison = True  # the NaN skip must be graph code, not a Python branch
    tracker = LossSimTracker(model)
    backend = CompileCounter()

    @torch.compile(fullgraph=True, backend=backend)
    def step(x):
        return model(x).nan_to_num().sum() * 0 + tracker.compute_loss_sim()

    loss = step(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    with dynamo.config.patch(error_on_recompile=True):
        step(torch.randn(2, 3, 8, 8))
    assert backend.frame_count == 1 and backend.op_count > 0


def test_inductor_compiles_a_tiny_decorated_model():
    block = decorated(PlainMlp, "width", token_sampling_type="v1", token_sampling_ratio=0.5)(4)
    compiled = torch.compile(block, fullgraph=True)
    # Training mode without autograd: Inductor builds the forward only (the backward doubles a
    # compile that already takes ~15 s on a 2-core CPU); fallback_random draws eager's tokens.
    with torch.no_grad(), torch._inductor.config.patch(fallback_random=True):
        _compiled_equals_eager(lambda x: compiled(x).sum() + compute_loss_sim(block), block, torch.randn(2, 6, 4))


# --- equivalence with simfx.transform ------------------------------------------------


def _copy_reconstructors(sim, model):
    for block in sim.sim_blocks:
        sim.simfx[block.key].objective.load_state_dict(model.get_submodule(block.name).simfx.objective.state_dict())


@pytest.mark.parametrize(
    "loss_type, sampling, ratio",
    [("norm_mse", "v0", 1.0), ("smooth_l1", "v1", 0.3), ("kl", "v2", 0.5)],
)
def test_same_loss_as_simfx_transform_on_the_undecorated_model(loss_type, sampling, ratio):
    plain, model = conv_pair(loss_type=loss_type, token_sampling_type=sampling, token_sampling_ratio=ratio)
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(plain, x, blocks=[PlainConv], loss=loss_type, token_ratio=ratio,
                          token_sampling={"v0": "shared", "v1": "per_sample", "v2": "topk_mean"}[sampling])
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    _copy_reconstructors(sim, model)
    tracker = LossSimTracker(model)
    results = []
    for collect in (lambda: compute_loss_sim(model), tracker.compute_loss_sim):
        torch.manual_seed(4)
        out, expected = sim(x)
        torch.manual_seed(4)
        assert torch.allclose(model(x), out, atol=1e-6)
        results.append((collect(), expected))
    for got, expected in results:
        assert got > 0
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_same_loss_as_simfx_transform_on_tokens():
    plain = TokenNet(PlainMlp)
    model = TokenNet(decorated(PlainMlp, "width", token_sampling_ratio=0.5))
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 6, 8)
    sim = simfx.transform(plain, x, blocks=[PlainMlp], token_ratio=0.5)
    _copy_reconstructors(sim, model)
    torch.manual_seed(5)
    _, expected = sim(x)
    torch.manual_seed(5)
    model(x)
    torch.testing.assert_close(compute_loss_sim(model), expected, rtol=1e-6, atol=1e-9)


def test_simfx_transform_of_a_decorated_model_traces_the_plain_forward():
    _, model = conv_pair()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8), blocks=[type(model.blocks[0])])
    assert len(sim.sim_blocks) == 3
    assert all(b.loss_sim is None for b in model.blocks)  # no fx Proxy was stored
    out, loss = sim(torch.randn(2, 3, 8, 8))
    assert loss > 0


# --- saving, copying, moving ----------------------------------------------------------------


def test_deepcopy_pickle_and_dtype_move():
    model = ConvNet(SimPlainConv)
    model(torch.randn(2, 3, 8, 8))
    compute_loss_sim(model)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone(torch.randn(2, 3, 8, 8))
    assert compute_loss_sim(clone) > 0
    double = copy.deepcopy(model).double()
    double(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert compute_loss_sim(double).dtype == torch.float32  # loss maths in float32


def test_eval_mode_model_exports_with_its_plain_output():
    model = ConvNet(SimPlainConv).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(program.module()(x), model(x))


def test_a_reference_checkpoint_loads_after_renaming():
    _, model = conv_pair()
    reference = {}
    for key, value in model.state_dict().items():  # lay the reconstructor out as SIM-pytorch saves it
        for ours, theirs in ((".simfx.objective.pre_proj.", ".pre_proj.0."), (".simfx.objective.predictor.", ".predictor.0.")):
            key = key.replace(ours, theirs)
        if ".simfx.objective.proj." in key:
            reference[key.replace(".simfx.objective.proj.", ".proj_y.")] = value
            key = key.replace(".simfx.objective.proj.", ".proj_x.")
        reference[key] = value
    _, fresh = conv_pair()
    fresh.load_state_dict(simfx.compat.reference_state_dict_to_simfx(fresh, reference))
    loaded = fresh.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name


# --- errors ---------------------------------------------------------------------------------


def test_missing_dim_attribute_names_the_block_the_attribute_and_the_fix():
    with pytest.raises(AttributeError, match=r"SimPlainConv.*'channels'.*self\.channels = .*input_dim_name=64"):
        decorated(PlainConv, "channels")(4, 4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"token_sampling_type": "v3"}, r"token_sampling_type='v3' is not one of \['v0', 'v1', 'v2'\]"),
        ({"token_sampling_ratio": 64}, "token count"),
        ({"channel_sampling_ratio": 0}, r"channel_sampling_ratio must be in \(0, 1\]"),
        ({"proj_type": "Conv"}, "not 'InvSS' nor a registered simfx objective"),
        ({"loss_type": "l1"}, "loss_type='l1'"),
        ({"sim_cfg": {"beta": 1.0}}, r"unknown init_proj sim_cfg key\(s\) \['beta'\]"),
        ({"sim_cfg": {"dim": 0}}, "dim must be a positive int"),
    ],
)
def test_bad_settings_fail_when_the_class_is_defined(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        decorated(PlainMlp, "width", **settings)


def test_forward_errors_name_the_block_and_the_fix():
    class NoInit(PlainMlp):
        @forward_with_sim_cache
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(TypeError, match=r"NoInit.*add @init_proj"):
        NoInit(4)(torch.randn(2, 3, 4))

    class Pair(PlainMlp):
        @init_proj("width")
        def __init__(self, width):
            super().__init__(width)

        @forward_with_sim_cache()
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(TypeError, match=r"Pair\.forward .* one tensor as its result; got Tensor -> tuple"):
        Pair(4)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"SimScale: the block's input has shape \(2, 3, 5\), .*channel_dim"):
        decorated(Scale, 4)()(torch.randn(2, 3, 5))
