"""Library models trained the way people train them: every shape, real sizes, checkpointing, adapters, experts.

Models that only torch.export can capture (Hugging Face, diffusers, Ultralytics,
research code with Python in its forward) train by running their own forward,
with SIM reading the chosen blocks at their module calls. Each test trains at
more than the example's shape, with the switches users flip, and compares with
the model itself.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import simfx
from conftest import call, float_tensors
from written_models import Conformer, ExamplesTransformerLM, MinGPT, NanoGPT, RNNModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import library_models  # noqa: E402
from library_models import LIBRARY, VOCAB  # noqa: E402


def _train_step(sim, inputs):
    sim.train()
    out, loss = call(sim, inputs)
    assert torch.isfinite(loss) and loss > 0
    (sum(t.float().square().mean() for t in float_tensors(out)) + loss).backward()
    missing = [n for n, p in sim.simfx.named_parameters() if p.grad is None]
    assert not missing, missing
    return out


def _eval_exact(sim, model, inputs):
    sim.eval()
    with torch.no_grad():
        got, zero = call(sim, inputs)
        expected = call(model, inputs)
    assert float(zero) == 0.0 and type(got) is type(expected)
    pairs = list(zip(float_tensors(got), float_tensors(expected), strict=True))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)
    sim.train()


def _library(name):
    pytest.importorskip(name.split("/")[0].replace("-", "_").replace("rtdl", "rtdl_revisiting_models"))
    torch.manual_seed(0)
    return LIBRARY[name].example()


# --- every sequence length and batch size ------------------------------------------------------------------------


TOKEN_MODELS = [
    "transformers/llama", "transformers/qwen2", "transformers/qwen3", "transformers/mistral", "transformers/gemma",
    "transformers/phi", "transformers/opt", "transformers/gpt2", "transformers/bert", "transformers/roberta",
    "transformers/distilbert", "transformers/t5", "transformers/bart", "transformers/mamba", "transformers/rwkv",
    "x-transformers/decoder",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_a_token_model_transformed_at_one_length_trains_at_another(name):
    model, example = _library(name)
    sim = simfx.transform(model, example)
    assert sim.simfx_info.runtime == "model" and sim.simfx_info.check == "passed"
    second = library_models.second_inputs(name)
    _train_step(sim, second)
    _eval_exact(sim, model, second)


@pytest.mark.parametrize("gpt", [NanoGPT, MinGPT])
def test_karpathys_gpts_train_at_every_length_their_block_size_allows(gpt):
    model = gpt()
    sim = simfx.transform(model, torch.randint(0, 64, (2, 16)))
    assert sim.simfx_info.plan.names == ["transformer.h.0", "transformer.h.1"]
    for batch, length in ((3, 21), (1, 9), (2, 32)):
        ids = torch.randint(0, 64, (batch, length))
        sim.train()
        (logits, loss), sim_loss = sim(ids, ids)  # called as the model is: (idx, targets) -> (logits, loss)
        assert logits.shape == (batch, length, 64) and sim_loss > 0
        (loss + sim_loss).backward()
    with pytest.raises(AssertionError, match="block size is only 32"):  # the model's own limit, its own message
        sim(torch.randint(0, 64, (2, 33)))


@pytest.mark.slow
@pytest.mark.parametrize("name, shapes", [
    ("transformers/llama", [(2, 8), (2, 23), (4, 8), (4, 15), (4, 23), (2, 15)]),
    ("transformers/bert", [(2, 8), (2, 23), (4, 8), (4, 15), (4, 23), (2, 15)]),
    ("transformers/t5", [(2, 8), (2, 23), (4, 8), (4, 15), (4, 23), (2, 15)]),
])
def test_token_models_train_at_three_lengths_and_two_batch_sizes_in_one_run(name, shapes):
    model, example = _library(name)
    sim = simfx.transform(model, example)
    optimizer = torch.optim.SGD(sim.parameters(), lr=1e-2)
    for batch, length in shapes:
        inputs = LIBRARY[name].inputs(batch, length)
        optimizer.zero_grad()
        _train_step(sim, inputs)
        optimizer.step()
        _eval_exact(sim, model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name, sizes", [
    ("diffusers/unet2d", (16, 32)), ("ultralytics/yolo11n", (64, 96)), ("transformers/swin", (32, 64)),
    ("transformers/dinov2", (56, 84)), ("transformers/segformer", (64, 96)),
])
def test_vision_models_train_at_two_resolutions_and_batch_sizes(name, sizes):
    model, example = _library(name)
    sim = simfx.transform(model, example)
    for batch, size in ((2, sizes[1]), (3, sizes[0]), (3, sizes[1])):
        inputs = LIBRARY[name].inputs(batch, size)
        _train_step(sim, inputs)
        _eval_exact(sim, model, inputs)


def test_a_batch_size_the_capture_saw_is_not_baked_in():
    pytest.importorskip("rtdl_revisiting_models")
    model, example = _library("rtdl/ft-transformer")  # reshapes with its batch size read in Python
    sim = simfx.transform(model, example)
    for batch in (3, 1, 5):  # an epoch's last, smaller batch too
        inputs = LIBRARY["rtdl/ft-transformer"].inputs(batch, 0)
        _train_step(sim, inputs)
        _eval_exact(sim, model, inputs)


# --- real sizes and dtypes through the check ---------------------------------------------------------------------


def _llama(hidden: int, layers: int, **dtype) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      max_position_embeddings=256, **dtype)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.slow
def test_a_hundred_million_parameter_llama_passes_the_check_and_trains_as_the_model_does():
    model = _llama(768, 12)
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 150e6
    example = {"input_ids": torch.randint(0, 16000, (2, 128))}
    sim = simfx.transform(model, example)
    assert sim.simfx_info.check == "passed" and len(sim.sim_blocks) == 12  # every decoder layer
    ids = torch.randint(0, 16000, (2, 96))
    torch.manual_seed(1)
    out, sim_loss = sim(input_ids=ids, labels=ids)
    torch.manual_seed(1)
    own = model(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, own.loss)  # the model's own training computation, bit for bit


@pytest.mark.slow
def test_resnet50_at_224_passes_the_check_of_its_traced_graph():
    model = torchvision.models.resnet50(num_classes=10)
    sim = simfx.transform(model, torch.randn(2, 3, 224, 224))
    assert sim.simfx_info.frontend == "fx" and sim.simfx_info.check == "passed"


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_bfloat16_models_pass_the_check_and_train(frontend):
    if frontend == "export":
        model = _llama(64, 2).to(torch.bfloat16)
        example, second = ({"input_ids": torch.randint(0, 16000, (n, length))} for n, length in ((2, 16), (3, 21)))
    else:
        model = torchvision.models.resnet18(num_classes=10).to(torch.bfloat16)
        example, second = (torch.randn(n, 3, size, size, dtype=torch.bfloat16) for n, size in ((2, 64), (3, 96)))
    sim = simfx.transform(model, example)
    assert sim.simfx_info.frontend == frontend and sim.simfx_info.check == "passed"
    _train_step(sim, second)
    _eval_exact(sim, model, second)


class Reassociating(nn.Module):
    """Sums three branches in another order when fx traces it (as library code picks traceable paths)."""

    def __init__(self, error: float = 0.0):
        super().__init__()
        self.error = error
        self.branches = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))

    def forward(self, x):
        a, b, c = (1e3 * branch(x) for branch in self.branches)
        if torch.fx._symbolic_trace.is_fx_tracing():
            total = a + (b + c) + self.error * a
        else:
            total = (a + b) + c
        return self.blocks(total)


def test_the_check_allows_float_reassociation_and_catches_a_real_difference():
    x = torch.randn(4, 32, 16)
    assert simfx.transform(Reassociating(), x, frontend="fx").simfx_info.check == "passed"
    with pytest.raises(simfx.FaithfulnessError, match="more than float rounding allows"):
        simfx.transform(Reassociating(error=1e-3), x, frontend="fx")


# --- gradient checkpointing -------------------------------------------------------------------------------------


def _checkpointing_step(sim, ids) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Tensors saved for backward in one training step, its loss, and the gradients it gives."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    sim.train()
    sim.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.manual_seed(3)
        out, sim_loss = sim(input_ids=ids, labels=ids)
        loss = out.loss + sim_loss
    loss.backward()
    return count, loss.detach(), {n: p.grad.clone() for n, p in sim.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_happens_with_the_same_loss_and_gradients(when):
    model, _ = _library("transformers/llama")
    if when == "before":
        model.gradient_checkpointing_enable()
    sim = simfx.transform(model, {"input_ids": torch.randint(0, VOCAB, (2, 16))})
    assert sim.simfx_info.check == "passed"
    if when == "after":
        sim.gradient_checkpointing_enable()  # what Trainer(gradient_checkpointing=True) calls
    assert model.is_gradient_checkpointing and sim.is_gradient_checkpointing
    ids = torch.randint(0, VOCAB, (2, 24))
    saved, loss, grads = _checkpointing_step(sim, ids)
    sim.gradient_checkpointing_disable()
    saved_without, loss_without, grads_without = _checkpointing_step(sim, ids)
    assert saved < saved_without  # the layers' activations are recomputed, not kept
    assert torch.equal(loss, loss_without) and grads.keys() == grads_without.keys()
    assert any(name.startswith("simfx.") for name in grads)  # the reconstructors train under checkpointing too
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_without[name], rtol=1e-5, atol=1e-7, msg=name)


def test_blocks_checkpointed_inside_the_models_own_forward_train_with_sim():
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(3)])
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            x = self.embed(x)
            for layer in self.layers:
                x = x + torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            return self.head(x)

    model = Checkpointed()
    sim = simfx.transform(model, torch.randn(2, 5, 8), frontend="export")
    assert sim.simfx_info.check == "passed"
    for length in (5, 9):
        _train_step(sim, torch.randn(3, length, 8))
    # Compiled, SIM's hook inside the checkpointed region is a side effect dynamo takes out of the graph.
    torch._dynamo.reset()
    _train_step(torch.compile(sim, backend="aot_eager"), torch.randn(3, 7, 8))


# --- hooks, experts, adapters --------------------------------------------------------------------------------------


def test_hooks_a_library_installs_on_the_first_call_still_run_after_transform():
    model, example = _library("transformers/segformer")  # transformers installs output-capturing hooks lazily
    sim = simfx.transform(model, example)
    inputs = LIBRARY["transformers/segformer"].inputs(3, 96)
    _train_step(sim, inputs)
    _eval_exact(sim, model, inputs)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(inputs).logits, fresh.eval()(inputs).logits)


def test_a_tcn_with_weight_norm_transforms_with_defaults():
    weight_norm = torch.nn.utils.weight_norm  # a forward pre-hook on each convolution

    class Chomp(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x):
            return x[:, :, :-self.size].contiguous()

    class TemporalBlock(nn.Module):
        def __init__(self, cin, cout, dilation):
            super().__init__()
            pad = 2 * dilation
            self.net = nn.Sequential(
                weight_norm(nn.Conv1d(cin, cout, 3, padding=pad, dilation=dilation)), Chomp(pad), nn.ReLU(),
                weight_norm(nn.Conv1d(cout, cout, 3, padding=pad, dilation=dilation)), Chomp(pad), nn.ReLU())
            self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None
            self.relu = nn.ReLU()

        def forward(self, x):
            res = x if self.downsample is None else self.downsample(x)
            return self.relu(self.net(x) + res)

    class TCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.network = nn.Sequential(*[TemporalBlock(4 if i == 0 else 16, 16, 2 ** i) for i in range(3)])
            self.linear = nn.Linear(16, 5)

        def forward(self, x):
            return self.linear(self.network(x)[:, :, -1])

    model = TCN()
    sim = simfx.transform(model, torch.randn(2, 4, 32))
    assert sim.simfx_info.plan.names == ["network.0", "network.1", "network.2"]
    for length in (32, 47):
        _train_step(sim, torch.randn(3, 4, length))
        _eval_exact(sim, model, torch.randn(3, 4, length))


def test_mixture_of_experts_trains_its_experts_as_the_model_does():
    model, example = _library("transformers/mixtral")
    sim = simfx.transform(model, example, beta=0.0)  # SIM adds nothing: gradients are the task's alone
    plain = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (3, 19))
    torch.manual_seed(5)
    out, _ = sim(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.manual_seed(5)
    plain(input_ids=ids, labels=ids).loss.backward()
    experts = [(n, p) for n, p in model.named_parameters() if "experts" in n]
    assert experts and all(p.grad is not None for _, p in experts)
    for (name, a), b in zip(experts, [p for n, p in plain.named_parameters() if "experts" in n]):
        assert torch.equal(a.grad, b.grad), name


def test_a_peft_lora_model_trains_only_its_adapters_and_reconstructors_and_saves_its_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base, _ = _library("transformers/llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    sim = simfx.transform(model, {"input_ids": torch.randint(0, VOCAB, (2, 16))})  # with defaults
    assert sim.simfx_info.check == "passed" and sim.sim_blocks
    optimizer = torch.optim.AdamW([p for p in sim.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for batch, length in ((2, 16), (3, 23)):
        ids = torch.randint(0, VOCAB, (batch, length))
        sim.train()
        out, sim_loss = sim(input_ids=ids, labels=ids)
        optimizer.zero_grad()
        (out.loss + sim_loss).backward()
        optimizer.step()
    trained = {n for n, p in sim.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n or n.startswith("simfx.") for n in trained)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    plain = simfx.strip(sim)
    assert plain is model
    plain.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_library("transformers/llama")[0], tmp_path)
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, dict(model.named_parameters())[name]), name


# --- the model's own call -------------------------------------------------------------------------------------------


def test_an_lstm_language_model_is_called_as_the_model_is():
    model = RNNModel()
    hidden = (torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))
    sim = simfx.transform(model, (torch.randint(0, 50, (7, 3)), hidden))
    for length, batch in ((7, 3), (11, 5)):
        state = (torch.zeros(2, batch, 16), torch.zeros(2, batch, 16))
        inputs = (torch.randint(0, 50, (length, batch)), state)
        (log_probs, new_state), sim_loss = sim(*inputs)  # sim(x, (h, c)), as the model is called
        assert log_probs.shape == (length, batch, 50) and len(new_state) == 2 and sim_loss > 0
        _eval_exact(sim, model, inputs)


def test_an_optional_keyword_the_example_did_not_pass_is_honoured():
    model, _ = _library("transformers/bert")
    sim = simfx.transform(model, {"input_ids": torch.randint(0, VOCAB, (2, 12))})  # no attention mask
    ids = torch.randint(0, VOCAB, (3, 15))
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[0, 10:] = 0  # padding, as DataCollatorWithPadding makes it
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "labels": torch.tensor([0, 1, 2])}):
        _train_step(sim, inputs)
        _eval_exact(sim, model, inputs)


# --- Python no trace takes, in the model's own forward ---------------------------------------------------------


def _esm2():
    esm = pytest.importorskip("esm")
    model = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=2, alphabet="ESM-1b", token_dropout=True)
    return model, lambda batch, length: (torch.randint(4, 24, (batch, length)),)


def _swin_unetr():
    nets = pytest.importorskip("monai.networks.nets")
    model = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 2, 2))
    return model, lambda batch, size: (torch.randn(batch, 1, size, size),)


def _transformer_lm():
    return ExamplesTransformerLM(), lambda batch, length: (torch.randint(0, 50, (length, batch)),)  # (S, N)


def _conformer():
    def inputs(batch, length):
        lengths = torch.randint(length // 2, length + 1, (batch,))
        lengths[0] = length
        return torch.randn(batch, length, 16), lengths

    return Conformer(), inputs


@pytest.mark.parametrize("build, sizes, layout", [
    (_esm2, (16, 21), "NBC"),  # `assert tokens.ndim == 2`, `if not padding_mask.any():`
    (_transformer_lm, (16, 21), "NBC"),  # `len(src)`, the mask cached on the module
    (_conformer, (16, 21), "NBC"),  # `int(torch.max(lengths).item())`
    (_swin_unetr, (64, 96), "NHWC"),  # `np.array(x.shape)`
], ids=["esm2", "transformer_lm", "conformer", "swin_unetr"])
def test_python_no_trace_takes_leaves_every_block_a_module_call_with_sim(build, sizes, layout):
    model, inputs = build()
    sim = simfx.transform(model, inputs(2, sizes[0]))
    assert sim.simfx_info.check == "passed" and sim.sim_blocks
    assert layout in {b.boundary.out_layout for b in sim.sim_blocks}  # sequence-first layers read as such
    for batch, size in ((3, sizes[1]), (1, sizes[0])):
        _train_step(sim, inputs(batch, size))
        _eval_exact(sim, model, inputs(batch, size))
