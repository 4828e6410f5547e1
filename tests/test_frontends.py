"""Models fx cannot trace as they are: bound inputs, automatic opaque blocks, the export frontend."""

from __future__ import annotations

import re
import types

import pytest
import torch
import torch._dynamo as dynamo
import torch.fx as fx
import torchvision
from torch import nn
from torch.utils import _pytree as pytree

import simfx
from conftest import ConvBlock


def leaves(value):
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def task_loss(out):
    return sum(t.float().square().mean() for t in leaves(out) if t.is_floating_point())


def assert_eval_exact(sim, model, *inputs):
    sim.eval()
    model.eval()
    with torch.no_grad():
        got, zero = sim(*inputs)
        expected = model(*inputs)
    assert float(zero) == 0.0
    assert type(got) is type(expected)
    pairs = list(zip(leaves(got), leaves(expected), strict=True))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)


def train_step(sim, *inputs, **keywords):
    sim.train()
    out, loss = sim(*inputs, **keywords)
    assert torch.isfinite(loss) and loss > 0
    (task_loss(out) + loss).backward()
    missing = [n for n, p in sim.simfx.named_parameters() if p.grad is None]
    assert not missing, f"reconstructor parameters without gradient: {missing}"
    return out, loss


# --- bound inputs --------------------------------------------------------------------


class VarArgsNet(nn.Module):
    """An Ultralytics-style forward: ``*args``, ``**kwargs`` and optional flags tested with ``if``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x, *args, augment=False, scale=None, **kwargs):
        if augment:
            x = torch.flip(x, [-1])
        if scale is not None:
            x = x * scale
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_varargs_forward_fails_in_plain_fx_but_transforms_with_the_inputs_bound():
    model = VarArgsNet()
    with pytest.raises(Exception, match=r"Proxy|control flow"):
        fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x, frontend="fx")
    assert sim.simfx_info.frontend == "fx"
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1"]
    assert [n.name for n in sim.graph.nodes if n.op == "placeholder"] == ["x"]
    train_step(sim, torch.randn(3, 3, 8, 8))
    assert_eval_exact(sim, model, x)


def test_non_tensor_and_keyword_example_inputs_are_bound_as_constants():
    model = VarArgsNet()
    x = torch.randn(2, 3, 8, 8)
    flipped = simfx.transform(model, {"x": x, "augment": True}, frontend="fx")
    flipped.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(flipped(x)[0], model(x, augment=True))
    scaled = simfx.transform(model, (x,), frontend="fx")
    with torch.no_grad():  # eval calls the model as it is called
        assert torch.equal(scaled(x, augment=True)[0], model(x, augment=True))
    scaled.train()
    with pytest.raises(TypeError, match="keyword argument 'augment', which the example did not pass"):
        scaled(x, augment=True)  # the training graph takes exactly the example's call


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, tokens, mask=None):
        h = self.embed(tokens)
        h = h + self.mlp(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h.mean(dim=1))


def test_dict_example_inputs_make_keyword_placeholders_in_order():
    model = MaskedNet()
    tokens, mask = torch.randn(2, 5, 6), torch.ones(2, 5)
    sim = simfx.transform(model, {"tokens": tokens, "mask": mask})
    assert [n.name for n in sim.graph.nodes if n.op == "placeholder"] == ["tokens", "mask"]
    train_step(sim, tokens, mask)
    assert_eval_exact(sim, model, tokens, mask)
    without_mask = simfx.transform(model, {"tokens": tokens})
    assert_eval_exact(without_mask, model, tokens)


# --- automatic opaque blocks ------------------------------------------------------


class ChunkBlock(nn.Module):
    """Ultralytics C2f in small: iterating a tensor (``list(x.chunk(2, 1))``) stops fx."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1 = nn.Conv2d(c, 2 * c, 1)
        self.m = nn.Conv2d(c, c, 3, padding=1)
        self.cv2 = nn.Conv2d(3 * c, c, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class ChunkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ChunkBlock(8), ChunkBlock(8), ChunkBlock(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_untraceable_submodules_become_opaque_blocks_with_reasons():
    model = ChunkNet()
    x = torch.randn(2, 3, 8, 8)
    table = simfx.find_boundaries(model, x, frontend="fx")
    assert table.frontend == "fx"
    assert set(table.opaque) == {"blocks.0", "blocks.1", "blocks.2"}
    # Each reason names what fx reported and the line it failed on.
    assert all(
        re.fullmatch(r"made opaque: Proxy object cannot be iterated at test_frontends\.py:\d+ "
                     r"`y = list\(self\.cv1\(x\)\.chunk\(2, 1\)\)`", reason)
        for reason in table.opaque.values()
    )
    assert "3 module(s) kept opaque:\n  blocks.0: made opaque: Proxy object cannot be iterated at" in str(table)
    rows = {r.name: r for r in table}
    assert [r.name for r in table.selected()] == ["blocks.0", "blocks.1", "blocks.2"]
    assert rows["blocks.0"].boundary.opaque and rows["blocks.0"].boundary.nodes == ("blocks_0",)

    sim = simfx.transform(model, x, frontend="fx")
    assert dict(sim.simfx_info.opaque) == table.opaque
    train_step(sim, x)
    assert model.blocks[1].m.weight.grad is not None  # gradients pass through the opaque block
    assert_eval_exact(sim, model, x)


def test_auto_opaque_off_raises_the_trace_error():
    with pytest.raises(simfx.TraceError, match=r"(?s)inside module 'blocks.0' .*ChunkBlock.*leaf_modules=\[ChunkBlock\]"):
        simfx.transform(ChunkNet(), torch.randn(2, 3, 8, 8), frontend="fx", auto_opaque=False)


class PairBlock(nn.Module):
    """Cannot be traced (a data-dependent branch) and returns (y, statistics)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 1e9:
            y = y / 2
        return y, y.mean()


class PairNet(nn.Module):
    def __init__(self, use_statistics: bool):
        super().__init__()
        self.use_statistics = use_statistics
        self.stem = nn.Conv2d(3, 8, 1)
        self.a, self.b = PairBlock(8), PairBlock(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h, stat_a = self.a(self.stem(x))
        h, stat_b = self.b(h)
        out = self.head(h.mean(dim=(2, 3)))
        return out + stat_a + stat_b if self.use_statistics else out


def test_opaque_block_returning_a_tuple_counts_when_only_element_zero_is_used():
    x = torch.randn(2, 3, 6, 6)
    model = PairNet(use_statistics=False)
    table = simfx.find_boundaries(model, x, frontend="fx")
    rows = {r.name: r for r in table}
    assert rows["a"].boundary.eligible and rows["a"].boundary.opaque
    assert [r.name for r in table.selected()] == ["a", "b"]  # repeated siblings, and shape-keeping
    sim = simfx.transform(model, x, frontend="fx")
    train_step(sim, x)
    assert_eval_exact(sim, model, x)

    used = {r.name: r for r in simfx.find_boundaries(PairNet(use_statistics=True), x, frontend="fx")}
    a = used["a"].boundary  # (y, statistics) both used: y is the primary output, the statistic a side output
    assert a.eligible and a.exit == "getitem" and len(a.side_outputs) == 1


class BranchingEncoder(nn.Module):
    """fx cannot trace it (a branch on a tensor value); it returns its result in a container, as Hugging Face
    encoders return a ModelOutput: a dict read by key, or an object read by attribute."""

    def __init__(self, container: str):
        super().__init__()
        self.container = container
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x) if x.sum() > 0 else x - layer(x)
        if self.container == "dict":
            return {"last_hidden_state": x, "hidden_states": None}
        return types.SimpleNamespace(last_hidden_state=x, hidden_states=None)


class EncoderNet(nn.Module):
    def __init__(self, container: str):
        super().__init__()
        self.container = container
        self.embed = nn.Linear(4, 8)
        self.encoder = BranchingEncoder(container)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out = self.encoder(self.embed(x))
        hidden = out["last_hidden_state"] if self.container == "dict" else out.last_hidden_state
        return self.head(hidden)


@pytest.mark.parametrize("container", ["dict", "attributes"])
def test_an_opaque_block_returning_a_container_is_read_through_it(container):
    model, x = EncoderNet(container), torch.randn(2, 5, 4)
    table = simfx.find_boundaries(model, x, frontend="fx")
    encoder = next(r for r in table if r.name == "encoder")
    assert encoder.selected and encoder.boundary.opaque
    assert encoder.boundary.exit != "encoder" and encoder.boundary.out_shape == (2, 5, 8)  # the tensor read from it
    assert "x.sum() > 0" in table.opaque["encoder"]  # the opaque reason names the line fx failed on
    # fx records `out.last_hidden_state` where it is first used (in head's call): it is still read outside head.
    assert next(r for r in table if r.name == "head").decision == "produces the model's output"
    sim = simfx.transform(model, x, frontend="fx")
    assert sim.simfx_info.check == "passed"
    train_step(sim, x)
    assert_eval_exact(sim, model, x)


def _clamp_rows(x):
    return x if x.sum() > 0 else -x


def clamp_rows(x):
    return _clamp_rows(x)


class CallsHelper(nn.Module):
    def __init__(self, public: bool):
        super().__init__()
        self.public = public
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(clamp_rows(self.a(x)) if self.public else _clamp_rows(self.a(x)))


def test_a_private_helper_gets_advice_that_works():
    x = torch.randn(2, 4)
    with pytest.raises(simfx.TraceError) as caught:
        simfx.transform(CallsHelper(public=False), x, frontend="fx")
    assert "autowrap_functions=[_clamp_rows]" not in str(caught.value)  # fx would skip it
    assert "call it through a public module-level function" in str(caught.value)
    # The advice: call it through a public name, and autowrap that.
    model = CallsHelper(public=True)
    sim = simfx.transform(model, x, frontend="fx", autowrap_functions=[clamp_rows], blocks=["a"])
    assert sim.simfx_info.check == "passed"
    assert_eval_exact(sim, model, x)


# --- torch.export frontend --------------------------------------------------------------


def test_export_frontend_on_resnet18_trains_evaluates_exactly_and_strips():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    sim = simfx.transform(model, x, frontend="export")
    assert sim.simfx_info.frontend == "export"
    traced = simfx.transform(model, x, frontend="fx")
    assert [b.name for b in sim.sim_blocks] == [b.name for b in traced.sim_blocks]
    assert len(sim.sim_blocks) == 6  # layer4's 1x1 output is too small at 32x32
    assert {k for k in sim.state_dict() if not k.startswith("simfx.")} == set(model.state_dict())

    tracked = model.bn1.num_batches_tracked.clone()
    train_step(sim, torch.randn(5, 3, 32, 32))  # another batch size: the batch axis is dynamic
    assert model.bn1.num_batches_tracked == tracked + 1  # BatchNorm statistics land in the user's buffers
    assert all(p.grad is not None for p in model.parameters())
    assert_eval_exact(sim, model, x)

    plain = simfx.strip(sim)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model.eval()(x))


class MaskedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList([Residual(16), Residual(16)])
        self.head = nn.Linear(16, 2)

    def forward(self, tokens, mask=None):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h.mean(dim=1))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_a_model_captured_by_export_trains_itself_at_every_shape_and_call_it_accepts():
    model = MaskedEncoder()
    example = {"tokens": torch.randn(2, 5, 6), "mask": torch.ones(2, 5)}
    sim = simfx.transform(model, example, frontend="export")
    assert sim.simfx_info.runtime == "model" and sim.simfx_info.check == "passed"
    assert sim.simfx_info.taps == {
        f"layers.{i}": (f"argument x of 'layers.{i}'", f"the result of 'layers.{i}'") for i in range(2)}
    for batch, length in ((3, 5), (3, 7), (1, 11)):
        train_step(sim, torch.randn(batch, length, 6), torch.ones(batch, length))
    train_step(sim, tokens=torch.randn(2, 9, 6))  # the mask left to the model's default, by keyword
    assert_eval_exact(sim, model, torch.randn(3, 7, 6), torch.ones(3, 7))
    sim.eval()
    with torch.no_grad():  # eval takes any call the model takes, with or without the example's arguments
        assert torch.equal(sim(torch.randn(2, 4, 6).fill_(1))[0], model(torch.ones(2, 4, 6)))
    # fx records shape arithmetic as graph nodes: its graph runs at other sizes too.
    traced = simfx.transform(MaskedEncoder(), example, frontend="fx")
    train_step(traced, torch.randn(3, 7, 6), torch.ones(3, 7))


def test_an_inline_residual_whose_sum_reaches_no_module_call_is_not_read_when_the_model_runs_itself():
    table = simfx.find_boundaries(MaskedNet(), {"tokens": torch.randn(2, 5, 6)}, frontend="export")
    residual = next(r for r in table if r.name == "mlp.residual")
    assert not residual.selected and "reaches no module call" in residual.decision
    assert "mlp.residual" in [r.name for r in simfx.find_boundaries(
        MaskedNet(), {"tokens": torch.randn(2, 5, 6)}, frontend="fx").selected()]


class RootChunks(nn.Module):
    """The model's own forward unpacks a tensor: fx fails where no submodule can be made opaque."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.blocks = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 8))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        a, b = list(self.stem(x).chunk(2, dim=1))
        return self.head(torch.cat([self.blocks(a), b], 1).mean(dim=(2, 3)))


def test_auto_switches_to_export_when_the_root_forward_cannot_be_traced():
    model = RootChunks()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(simfx.TraceError, match=r"could not trace RootChunks.forward"):
        simfx.transform(model, x, frontend="fx")
    sim = simfx.transform(model, x)
    assert sim.simfx_info.frontend == "export"
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1"]
    train_step(sim, x)
    assert_eval_exact(sim, model, x)


def test_auto_prefers_export_when_opaque_blocks_hide_most_of_the_model():
    model = ChunkNet()
    x = torch.randn(2, 3, 8, 8)
    sim = simfx.transform(model, x)
    assert sim.simfx_info.frontend == "export" and dict(sim.simfx_info.opaque) == {}
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    train_step(sim, x)
    assert_eval_exact(sim, model, x)


class DataDependent(nn.Module):
    """Branches on a tensor's value in its own forward, and calls no submodule: nothing captures it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight if x.sum() > 0 else -(x @ self.weight)


def test_auto_reports_every_capture_it_tried_when_none_can():
    with pytest.raises(simfx.TraceError) as info:
        simfx.transform(DataDependent(), torch.randn(2, 4))
    message = str(info.value)
    assert "could not trace DataDependent.forward" in message
    assert "simfx also tried torch.export (frontend='auto')" in message
    assert "simfx also tried capturing its module calls one by one (frontend='calls'): DataDependent's forward " \
           "calls no submodule" in message


def test_captures_that_fail_leave_nothing_on_the_terminal_but_simfxs_error(capfd, caplog):
    caplog.set_level("DEBUG")
    with pytest.raises(simfx.TraceError):
        simfx.transform(DataDependent(), torch.randn(2, 4))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # torch.export prints the partial graph of a failed capture to stderr
    assert not [r for r in caplog.records if r.name.startswith("torch")]  # and logs its guard failures


class BranchesOnValues(nn.Module):
    """Python on tensor values around plain module calls, as research code writes it: no trace takes the forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.layers = nn.ModuleList([Residual(16), Residual(16), Residual(16)])
        self.head = nn.Linear(16, 2)

    def forward(self, x, lengths):
        longest = int(lengths.max().item())  # sizes read from values
        h = self.embed(x[:, :longest])
        if not bool((lengths > 0).all()):
            h = h * 0
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def test_a_forward_no_trace_takes_gets_sim_on_its_module_calls():
    model = BranchesOnValues()
    example = (torch.randn(2, 7, 4), torch.tensor([7, 5]))
    with pytest.raises(simfx.TraceError):
        simfx.transform(model, example, frontend="export")
    sim = simfx.transform(model, example)
    assert sim.simfx_info.frontend == "calls" and sim.simfx_info.runtime == "model"
    assert sim.simfx_info.plan.names == ["layers.0", "layers.1", "layers.2"]
    assert sim.simfx_info.check == "passed"
    for batch, length in ((3, 9), (1, 4)):
        inputs = (torch.randn(batch, length, 4), torch.full((batch,), length))
        train_step(sim, *inputs)
        assert_eval_exact(sim, model, *inputs)


def test_export_train_graph_compiles_to_one_graph():
    sim = simfx.transform(ChunkNet(), torch.randn(2, 3, 8, 8), frontend="export").train()
    dynamo.reset()
    report = dynamo.explain(sim)(torch.randn(2, 3, 8, 8))
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons


# --- real model families (optional test dependencies) -------------------------------------


def _hf_models():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32,
    ))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    ))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=5,
    ))
    ids = torch.randint(0, 100, (2, 12))
    return {"bert": (bert, ids, 4), "gpt2": (gpt2, ids, 2), "vit": (vit, torch.randn(2, 3, 32, 32), 2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_hugging_face_models_through_the_export_frontend(name):
    model, inputs, blocks = _hf_models()[name]
    sim = simfx.transform(model, inputs)
    assert sim.simfx_info.frontend == "export"
    assert len(sim.sim_blocks) == blocks  # attention and feed-forward residuals, or whole pre-norm layers
    out, _ = train_step(sim, inputs)
    assert type(out).__name__ == type(model(inputs)).__name__
    assert_eval_exact(sim, model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_yolo_from_yaml_transforms_with_no_extra_arguments(config):
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(config, verbose=False)
    x = torch.randn(2, 3, 64, 64)
    sim = simfx.transform(model, x)
    assert sim.sim_blocks and all(".m." in b.name for b in sim.sim_blocks)  # the bottlenecks inside C2f/C3k2
    train_step(sim, x)
    assert_eval_exact(sim, model, x)

    table = simfx.find_boundaries(model, x, frontend="fx")
    assert table.opaque and all(r.startswith("made opaque: ") for r in table.opaque.values())
    assert any("Proxy object cannot be iterated" in r for r in table.opaque.values())
    assert {r.name for r in table.selected()} >= {"model.2", "model.4"}


class _SignBranchResidual(nn.Module):
    """A residual block fx cannot trace (a data-dependent branch), as library code often has."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return x + self.conv(x)
        return x - self.conv(x)


def test_timm_notrace_registrations_are_honoured_without_opaque_retries():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _SignBranchResidual(), _SignBranchResidual(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(simfx.TraceError):
        simfx.transform(model, x, frontend="fx", auto_opaque=False)

    timm_layers.register_notrace_module(_SignBranchResidual)
    sim = simfx.transform(model, x, frontend="fx", auto_opaque=False)
    kept_whole = {n.target for n in sim.graph.nodes if n.op == "call_module"}
    assert {"1", "2"} <= kept_whole
    assert {b.name for b in sim.simfx_info.plan.blocks} == {"1", "2"}  # repeated siblings
    train_step(sim, x)
    assert_eval_exact(sim, model, x)
