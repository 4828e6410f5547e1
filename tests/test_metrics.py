"""simfx.metrics: weight spread per layer and pooled, and per-block loss logging."""

from __future__ import annotations

import doctest
import logging

import pytest
import torch
from torch import nn

import simfx
from conftest import TinyResNet
from simfx.metrics import BlockLossMeter, log_block_losses, weight_std


class WithExtras(nn.Module):
    """Layers whose weights count, and parameters that are not layer weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(3)  # 1-D weight: a scale, not a layer weight
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))  # 3-D but not a weight
        self.fc = nn.Linear(4, 2)
        self.tied = self.fc  # the same parameters again: count once


# --- weight_std ----------------------------------------------------------------------


def test_weight_std_by_hand():
    model = WithExtras()
    stats = weight_std(model)
    layers = {
        "conv": model.conv.weight,
        "attn.in_proj_weight": model.attn.in_proj_weight,
        "attn.out_proj": model.attn.out_proj.weight,
        "fc": model.fc.weight,
    }
    assert list(stats.per_layer) == list(layers)
    for name, weight in layers.items():
        assert stats.per_layer[name] == pytest.approx(weight.detach().double().std().item(), rel=1e-12)
    pooled = torch.cat([w.detach().double().flatten() for w in layers.values()])
    assert stats.numel == pooled.numel() == 54 + 48 + 16 + 8
    assert stats.overall == pytest.approx(pooled.std().item(), rel=1e-12)


def test_overall_pools_weights_rather_than_averaging_layer_stds():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        model[1].weight.copy_(torch.tensor([[10.0, 10.0], [10.0, 10.0]]))
    stats = weight_std(model)
    assert stats.per_layer["1"] == 0.0
    assert stats.per_layer["0"] == pytest.approx(torch.arange(1.0, 7.0).std().item())
    values = torch.tensor([1.0, 2, 3, 4, 5, 6, 10, 10, 10, 10], dtype=torch.float64)
    assert stats.overall == pytest.approx(values.std().item(), rel=1e-12)  # 3.6878..., not mean(1.87, 0)


def test_weight_std_of_a_transformed_model_leaves_reconstructors_out():
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(2, 3, 16, 16))
    plain = weight_std(model)
    default = weight_std(sim)
    assert default == plain
    assert not any(name.startswith("simfx.") for name in default.per_layer)
    with_sim = weight_std(sim, include_sim=True)
    sim_layers = [n for n in with_sim.per_layer if n.startswith("simfx.")]
    assert "simfx.blocks_0.objective.predictor" in sim_layers
    assert with_sim.numel == plain.numel + sum(
        p.numel() for n, p in sim.named_parameters() if n.startswith("simfx.") and p.dim() >= 2
    )


def test_weight_std_errors_when_there_is_nothing_to_measure():
    with pytest.raises(ValueError, match="LayerNorm has no layer weight"):
        weight_std(nn.LayerNorm(4))


def test_weight_std_narrows_when_weights_shrink():
    model = TinyResNet()
    before = weight_std(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    after = weight_std(model)
    assert after.overall == pytest.approx(before.overall / 2)
    assert "overall" in str(after) and "blocks.0.conv1" in str(after)


# --- per-block loss logging -------------------------------------------------------------


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))


def test_log_block_losses_to_logger_and_writer(caplog):
    per_block = {"layer1.0": torch.tensor(0.5), "layer1.1": torch.tensor(float("nan"))}
    writer = FakeWriter()
    logger = logging.getLogger("simfx.test")
    with caplog.at_level(logging.INFO, logger="simfx.test"):
        values = log_block_losses(per_block, step=7, logger=logger, writer=writer, prefix="train/sim/")
    assert values["layer1.0"] == 0.5 and values["layer1.1"] != values["layer1.1"]  # nan
    assert caplog.messages == ["step 7: layer1.0=0.5 layer1.1=nan"]
    assert writer.scalars[0] == ("train/sim/layer1.0", 0.5, 7)
    assert [t for t, _, _ in writer.scalars] == ["train/sim/layer1.0", "train/sim/layer1.1"]
    assert log_block_losses({}) == {}


def test_meter_means_skip_non_finite_steps_and_reset_after_log():
    meter = BlockLossMeter()
    meter.update({"a": torch.tensor(1.0), "b": torch.tensor(float("inf")), "c": torch.tensor(float("nan"))})
    meter.update({"a": torch.tensor(2.0), "b": torch.tensor(4.0), "c": torch.tensor(float("nan"))})
    meter.update({"a": torch.tensor(6.0), "b": torch.tensor(8.0), "c": torch.tensor(float("nan"))})
    means = meter.compute()
    assert means["a"] == pytest.approx(3.0) and means["b"] == pytest.approx(6.0)
    assert means["c"] != means["c"]  # never finite: nan, not 0
    assert meter.steps == 3
    writer = FakeWriter()
    assert meter.log(step=3, writer=writer)["a"] == pytest.approx(3.0)
    assert meter.steps == 0 and meter.compute() == {}
    assert len(writer.scalars) == 3


def test_meter_update_does_not_read_values_back_to_the_host(monkeypatch):
    """update() stays on the device: no .item(), .tolist(), float() or bool() of a tensor."""
    meter = BlockLossMeter()
    per_block = {"a": torch.tensor(1.0, requires_grad=True) * 2, "b": torch.tensor(3.0)}

    def host_read(*args, **kwargs):
        raise AssertionError("host read in BlockLossMeter.update")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, host_read)
        meter.update(per_block)
        meter.update(per_block)
    assert meter.compute() == {"a": 2.0, "b": 3.0}


def test_meter_over_real_training_steps_matches_per_step_values():
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(2, 3, 16, 16), per_block=True)
    meter = BlockLossMeter()
    history = []
    for _ in range(3):
        out, sim_loss, per_block = sim(torch.randn(4, 3, 16, 16))
        (out.square().mean() + sim_loss).backward()
        meter.update(per_block)
        history.append(log_block_losses(per_block))
    means = meter.compute()
    assert list(means) == ["blocks.0", "blocks.1", "blocks.2"]
    for name in means:
        assert means[name] == pytest.approx(sum(h[name] for h in history) / 3, rel=1e-6)
    assert not any(v.requires_grad for v in meter._sums.values())  # no autograd history kept alive


def test_metrics_docstring_examples_run():
    failures, tried = doctest.testmod(simfx.metrics, optionflags=doctest.ELLIPSIS)[:2]
    assert tried > 0 and failures == 0


# --- TensorBoard: what a SummaryWriter gets, read back from its event files ----------------


def _read_events(log_dir):
    """Scalars ``{tag: [(step, value), ...]}`` and the custom-scalars layout of a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    layout = layout_pb2.Layout()
    if "custom_scalars__config__" in events.Tags()["tensors"]:
        layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return scalars, layout


def test_readme_block_writes_per_block_losses_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    import torch.nn.functional as F

    from readme_blocks import run_readme_block

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 5, (24,), generator=g))
    sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), per_block=True)
    steps = []  # each training step's per-block losses, as the forward returned them
    sim.register_forward_hook(lambda module, args, output: steps.append(log_block_losses(output[2])))
    run_readme_block("tensorboard", simfx=simfx, F=F, sim=sim, log_dir=str(tmp_path), log_every=3,
                     loader=torch.utils.data.DataLoader(data, batch_size=4),
                     optimizer=torch.optim.SGD(sim.parameters(), lr=0.05))

    scalars, layout = _read_events(tmp_path)
    blocks = ["blocks.0", "blocks.1", "blocks.2"]
    assert len(steps) == 6 and sorted(scalars) == [f"sim/{b}" for b in blocks]
    for block in blocks:
        assert [step for step, _ in scalars[f"sim/{block}"]] == [3, 6]  # one point per window of three steps
        for step, value in scalars[f"sim/{block}"]:
            window = [s[block] for s in steps[step - 3:step]]
            assert value == pytest.approx(sum(window) / 3, rel=1e-5) and value > 0
    (category,) = layout.category  # add_block_loss_chart: one multi-line chart over every sim/ tag
    assert category.title == "simfx" and category.chart[0].title == "SIM loss per block"
    assert list(category.chart[0].multiline.tag) == ["^sim/.*"]
