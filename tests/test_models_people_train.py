"""One call on the models people train: LLMs as configured, blocks with side inputs, RNNs, library models.

Each model is built as its library or repository builds it (tiny, random init,
defaults first), transformed with no options, trained one step, and compared
with the model itself in eval mode.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import simfx
from conftest import InlineResidualNet, call, float_tensors
from written_models import DiT, DiTBlock, DecoderLayer, GCN, PointNet, RNNModel, RNNStack, TinyLlama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import library_models  # noqa: E402


def _trains_and_evaluates(sim, model, inputs):
    sim.train()
    out, loss = call(sim, inputs)
    assert torch.isfinite(loss) and loss > 0
    (sum(t.float().square().mean() for t in float_tensors(out)) + loss).backward()
    missing = [n for n, p in sim.simfx.named_parameters() if p.grad is None]
    assert not missing, missing
    sim.eval()
    with torch.no_grad():
        got, zero = call(sim, inputs)
        expected = call(model, inputs)
    assert float(zero) == 0.0 and type(got) is type(expected)
    assert all(torch.equal(a, b) for a, b in zip(float_tensors(got), float_tensors(expected), strict=True))
    return out


# --- blocks with side inputs and side outputs ----------------------------------------------------


def test_dit_blocks_take_sim_with_their_conditioning_as_context():
    model = DiT()
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([1, 5]))
    sim = simfx.transform(model, inputs)
    assert [b.name for b in sim.sim_blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    block = sim.sim_blocks[0].boundary
    assert block.in_shape == block.out_shape == (2, 16, 32) and len(block.context) == 1
    assert set(sim.simfx_info.calls) == {"blocks.0", "blocks.1", "blocks.2"}  # run as calls, conditioning passed
    assert simfx.transform(model, inputs, blocks=[DiTBlock]).simfx_info.plan.names == ["blocks.0", "blocks.1", "blocks.2"]
    _trains_and_evaluates(sim, model, inputs)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_llama_style_decoder_layers_are_whole_blocks(frontend):
    model = TinyLlama()
    inputs = (torch.randint(0, 64, (2, 9)), torch.ones(2, 9, dtype=torch.long))
    sim = simfx.transform(model, inputs, frontend=frontend, blocks=[DecoderLayer])
    assert [b.name for b in sim.sim_blocks] == ["layers.0", "layers.1"]
    assert sim.simfx_info.check == "passed"
    auto = simfx.transform(model, inputs, frontend=frontend)
    assert [b.name for b in auto.sim_blocks] == ["layers.0", "layers.1"]
    _trains_and_evaluates(sim, model, inputs)


def test_gcn_layers_read_node_features_and_take_the_adjacency_as_context():
    model = GCN()
    inputs = (torch.randn(10, 8), torch.rand(10, 10))
    sim = simfx.transform(model, inputs)
    assert [b.name for b in sim.sim_blocks] == ["conv1", "conv2"]  # weighted children of the model
    assert sim.sim_blocks[0].boundary.context == ("adjacency",)
    _trains_and_evaluates(sim, model, inputs)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layers_are_blocks_with_their_state_as_side_output(kind):
    model = RNNStack(kind)
    ids = torch.randint(0, 50, (2, 7))
    sim = simfx.transform(model, ids)
    assert [b.name for b in sim.sim_blocks] == ["rnns.0", "rnns.1", "rnns.2"]
    assert sim.sim_blocks[0].boundary.exit != "rnns_0"  # output 0 of (output, state), the state unused
    _trains_and_evaluates(sim, model, ids)
    gru = RNNModel("GRU")  # its state is returned and one tensor: a side output of the block
    sim = simfx.transform(gru, (torch.randint(0, 50, (7, 2)), torch.zeros(2, 2, 16)))
    rnn = next(b.boundary for b in sim.sim_blocks if b.name == "rnn")
    assert len(rnn.side_outputs) == 1


def test_a_hidden_state_passed_in_is_an_input_not_a_constant():
    model = RNNModel()
    hidden = (torch.zeros(2, 2, 16), torch.zeros(2, 2, 16))
    ids = torch.randint(0, 50, (7, 2))
    sim = simfx.transform(model, (ids, hidden))
    assert "rnn" in [b.name for b in sim.sim_blocks]
    assert [n.target for n in sim.graph.nodes if n.op == "placeholder"] == ["input", "hidden_0", "hidden_1"]
    sim.eval()
    model.eval()
    warm = (torch.randn(2, 2, 16), torch.randn(2, 2, 16))  # truncated BPTT passes the last state on
    with torch.no_grad():
        (got, got_hidden), _ = sim(ids, *warm)
        expected, expected_hidden = model(ids, warm)
    assert torch.equal(got, expected) and all(torch.equal(a, b) for a, b in zip(got_hidden, expected_hidden))
    sim.train()
    (out, state), loss = sim(ids, *warm)
    assert isinstance(state, tuple) and loss > 0


def test_models_with_no_residual_and_no_container_get_their_weighted_layers():
    model = PointNet()
    x = torch.randn(2, 3, 64)
    sim = simfx.transform(model, x)
    assert [b.name for b in sim.sim_blocks] == ["conv1", "conv2", "conv3", "fc1"]
    _trains_and_evaluates(sim, model, x)


def test_the_primary_input_can_be_chosen():
    model = DiT()
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([1, 5]))
    table = simfx.find_boundaries(model, inputs)
    block = next(r.boundary for r in table if r.name == "blocks.0")
    assert [tuple(p.meta.shape) for p in block.inputs] == [(2, 32), (2, 16, 32)] or \
        [tuple(p.meta.shape) for p in block.inputs] == [(2, 16, 32), (2, 32)]
    other = next(i for i, p in enumerate(block.inputs) if p.node != block.entry)
    sim = simfx.transform(model, inputs, blocks=["blocks.0"], overrides={"blocks.0": {"primary_input": other}})
    assert sim.sim_blocks[0].boundary.in_shape == (2, 32)
    with pytest.raises(simfx.SelectorError, match=r"block 'blocks\.0': primary_input=5, but it has 2 tensor input\(s\)"):
        simfx.transform(model, inputs, blocks=["blocks.0"], overrides={"blocks.0": {"primary_input": 5}})


# --- names ---------------------------------------------------------------------------------------------


def test_residual_regions_are_named_by_module_and_the_same_under_both_frontends():
    model = InlineResidualNet()
    x = torch.randn(2, 5, 8)
    names = {}
    for frontend in ("fx", "export"):
        table = simfx.find_boundaries(model, x, frontend=frontend)
        names[frontend] = [r.name for r in table if r.boundary.kind == "residual"]
    assert names["fx"] == names["export"] == ["mlps.0.residual", "mlps.1.residual", "mlps.2.residual"]
    sim = simfx.transform(model, x, exclude="mlps.0.residual")
    assert "mlps.0.residual" not in sim.simfx_info.plan.names


# --- library models ----------------------------------------------------------------------------------------

LIBRARY = [
    "transformers/llama", "transformers/qwen2", "transformers/mistral", "transformers/gpt2", "transformers/t5",
    "transformers/swin", "transformers/convnext_v2", "transformers/sam_vision", "diffusers/unet2d",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", LIBRARY)
def test_library_models_transform_with_defaults(name):
    pytest.importorskip(name.split("/")[0])
    model, inputs = library_models.LIBRARY_MODELS[name]()
    sim = simfx.transform(model, inputs)
    assert sim.sim_blocks and sim.simfx_info.check == "passed"
    _trains_and_evaluates(sim, model, inputs)
    if name in ("transformers/llama", "transformers/gpt2", "transformers/t5"):
        assert any("use_cache=False" in note for note in sim.simfx_info.notes)
    if name == "transformers/convnext_v2":  # the block, not its GRN norm (a residual of no weight layer)
        assert all(b.boundary.type_name == "ConvNextV2Layer" for b in sim.sim_blocks)
    if name == "transformers/sam_vision":  # windowed and global blocks alike, at one granularity
        assert {b.boundary.type_name for b in sim.sim_blocks} == {"SamVisionLayer"}


def test_a_cache_output_export_cannot_capture_is_explained():
    transformers = pytest.importorskip("transformers")

    class ReturnsCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

        def forward(self, x):
            cache = transformers.DynamicCache()
            return self.blocks(x), cache

    with pytest.raises(simfx.TraceError, match=r"returns a DynamicCache object.*pass use_cache=False"):
        simfx.transform(ReturnsCache(), torch.randn(2, 4, 8), frontend="export")


# --- wav2vec2: training-time randomness in Python ----------------------------------------------------------


def _wav2vec2(**config):
    pytest.importorskip("transformers")
    return library_models.wav2vec2(**config)


@pytest.mark.slow
def test_wav2vec2_layerdrop_is_drawn_every_step_with_the_encoder_as_one_block():
    # Dropout off, so the output varies only with LayerDrop's draws; SpecAugment off (see the next test).
    no_dropout = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                      final_dropout=0.0)
    model, inputs = _wav2vec2(mask_time_prob=0.0, layerdrop=0.5, **no_dropout)
    sim = simfx.transform(model, inputs, frontend="fx")  # auto: the same, after trying export (which refuses)
    # The encoder draws `torch.rand([]) < layerdrop` in Python each step: it runs as one call of its own code.
    assert sim.simfx_info.plan.names == ["wav2vec2.encoder"] and sim.simfx_info.check == "passed"
    outputs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out, loss = sim(**inputs)
        torch.manual_seed(seed)
        assert torch.equal(out.logits, model(**inputs).logits) and loss > 0  # the model's own draw, each step
        outputs.add(round(float(out.logits.detach().sum()), 3))
    assert len(outputs) >= 2  # the layers kept differ from step to step: nothing was frozen at trace time
    _trains_and_evaluates(sim, model, inputs)

    # Without LayerDrop the encoder's layers are traced, and each takes SIM.
    model, inputs = _wav2vec2(mask_time_prob=0.0, layerdrop=0.0)
    sim = simfx.transform(model, inputs, frontend="export")
    assert {"wav2vec2.encoder.layers.0", "wav2vec2.encoder.layers.1"} <= set(sim.simfx_info.plan.names)


def test_wav2vec2_with_defaults_says_why_no_block_can_take_sim_and_what_to_change():
    # SpecAugment (mask_time_prob=0.05) draws its masks with NumPy from shapes in Wav2Vec2Model's own forward:
    # no trace keeps that, so the whole Wav2Vec2Model runs as one call and hides every layer.
    model, inputs = _wav2vec2()
    with pytest.raises(simfx.NoEligibleBlockError) as caught:
        simfx.transform(model, inputs, frontend="fx")
    message = str(caught.value)
    assert re.search(r"wav2vec2 \(Wav2Vec2Model, \d+ weight layers\): made opaque: .* at modeling_wav2vec2\.py:\d+ "
                     r"`if mask_length > sequence_length:`", message), message
    assert "mask_time_prob=0.05 (SpecAugment time masks), layerdrop=0.1 (LayerDrop)" in message
    assert "model.config.mask_time_prob = 0.0" in message
