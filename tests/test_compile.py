"""torch.compile, mixed precision and export of transformed modules.

Dynamo-level facts (one graph, no breaks, recompiles) are checked with dynamo's
``explain`` and a counting backend, which capture graphs without running Inductor
(Inductor on a 2-core CPU takes minutes for a ResNet). Inductor itself compiles a
tiny model here; GPU-only tests (CUDA graphs, autotuning, fp16 scaling) skip
without CUDA.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo as dynamo
import torchvision
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import simfx
from conftest import TinyResNet



def small_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "small_vit": (small_vit, (2, 3, 32, 32)),
}
# The fullgraph promise on the real ViT-B/16 and on a model captured by the export frontend.
STEP_MODELS = {
    **{name: (*entry, {}) for name, entry in MODELS.items()},
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), (2, 3, 32, 32), {}),
    "tiny_resnet_export": (TinyResNet, (2, 3, 16, 16), {"frontend": "export"}),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _step(module, x):
    out, loss = module(x)
    (out.float().square().mean() + loss).backward()
    return loss


@pytest.mark.parametrize("name", list(MODELS))
def test_train_graph_is_one_graph_without_breaks(name):
    factory, shape = MODELS[name]
    sim = simfx.transform(factory(), torch.randn(*shape)).train()
    report = dynamo.explain(sim)(torch.randn(*shape))
    assert report.graph_count == 1
    assert report.graph_break_count == 0, report.break_reasons


@pytest.mark.parametrize("name", list(STEP_MODELS))
def test_no_recompile_across_steps_and_one_graph_per_mode(name):
    factory, shape, options = STEP_MODELS[name]
    sim = simfx.transform(factory(), torch.randn(*shape), **options).train()
    assert sim.simfx_info.frontend == options.get("frontend", "fx")
    backend = CompileCounter()
    compiled = torch.compile(sim, backend=backend, fullgraph=True)
    _step(compiled, torch.randn(*shape))
    with dynamo.config.patch(error_on_recompile=True):
        _step(compiled, torch.randn(*shape))  # steps 2 and 3 reuse the graph
        _step(compiled, torch.randn(*shape))
    assert backend.frame_count == 1
    sim.eval()
    with torch.no_grad():
        compiled(torch.randn(*shape))
        compiled(torch.randn(*shape))
    sim.train()
    _step(compiled, torch.randn(*shape))
    assert backend.frame_count == 2  # one graph per mode, switching back reuses the first


def test_new_batch_size_recompiles_once_then_reuses_a_dynamic_graph():
    factory, shape = MODELS["resnet18"]
    sim = simfx.transform(factory(), torch.randn(*shape)).train()
    backend = CompileCounter()
    compiled = torch.compile(sim, backend=backend, fullgraph=True)
    _step(compiled, torch.randn(*shape))
    _step(compiled, torch.randn(5, *shape[1:]))  # automatic dynamic shapes: one recompile
    assert backend.frame_count == 2
    with dynamo.config.patch(error_on_recompile=True):
        _step(compiled, torch.randn(7, *shape[1:]))
        _step(compiled, torch.randn(3, *shape[1:]))
    assert backend.frame_count == 2


def test_a_model_that_trains_itself_compiles_as_the_model_does_at_every_length():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    sim = simfx.transform(model, {"input_ids": torch.randint(0, 64, (2, 12))})
    assert sim.simfx_info.runtime == "model"

    def frames(module, lengths) -> int:
        dynamo.reset()
        backend = CompileCounter()
        compiled = torch.compile(module, backend=backend, fullgraph=True)
        for batch, length in lengths:
            ids = torch.randint(0, 64, (batch, length))
            out = compiled(input_ids=ids, labels=ids)
            loss = out[0].loss + out[1] if isinstance(out, tuple) else out.loss
            loss.backward()
        return backend.frame_count

    steps = [(2, 12), (2, 12), (3, 17), (2, 23), (4, 9)]
    assert frames(sim, steps[:2]) == 1  # one graph, no recompile on the second step at the same shape
    assert frames(sim, steps) == frames(model, steps)  # new lengths recompile as often as the model itself


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_true_compiles_one_graph_for_all_batch_sizes(name):
    factory, shape = MODELS[name]
    sim = simfx.transform(factory(), torch.randn(*shape)).train()
    backend = CompileCounter()
    compiled = torch.compile(sim, backend=backend, fullgraph=True, dynamic=True)
    with dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 5):
            loss = _step(compiled, torch.randn(batch, *shape[1:]))
            assert torch.isfinite(loss) and loss > 0
    assert backend.frame_count == 1


def test_inductor_matches_eager_without_sampling(monkeypatch):
    """Same maths compiled: with token_ratio=1.0 nothing is random."""
    from simfx.runtime import fused

    # On a CPU each block is one operator, handed the maps in the layout inductor
    # chose for them (channels_last here, where eager mode has contiguous maps).
    layouts = []
    sample = fused.sample_block_tokens

    def recording(x, y, **kwargs):
        layouts.append(y.is_contiguous(memory_format=torch.channels_last))
        return sample(x, y, **kwargs)

    monkeypatch.setattr(fused, "sample_block_tokens", recording)
    sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), token_ratio=1.0, copy=True).train()
    eager = copy.deepcopy(sim)
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(sim, fullgraph=True)
    loss_compiled = _step(compiled, x)
    assert len(layouts) == 3  # the three blocks ran the operator
    loss_eager = _step(eager, x)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-7)
    for (name, p), (_, q) in zip(sim.named_parameters(), eager.named_parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


def test_inductor_sampled_losses_have_the_eager_mean():
    """Compiled RNG streams differ from eager ones, so compare the mean loss over many draws."""
    sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), token_ratio=0.1, token_sampling="per_sample")
    sim.train()
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(sim, fullgraph=True)
    draws = 120
    with torch.no_grad():
        eager = torch.stack([sim(x)[1] for _ in range(draws)])
        fast = torch.stack([compiled(x)[1] for _ in range(draws)])
    assert eager.std() > 0 and fast.std() > 0  # sampling really happens in both
    standard_error = math.sqrt(eager.var().item() / draws + fast.var().item() / draws)
    assert abs(eager.mean().item() - fast.mean().item()) < 4 * standard_error


def test_autocast_bf16_on_cpu_keeps_loss_maths_in_float32(monkeypatch):
    from simfx.runtime import losses as objectives

    seen = []
    original = objectives.LOSS_FUNCTIONS["norm_mse"]

    def spy(prediction, target):
        seen.append((prediction.dtype, target.dtype))
        return original(prediction, target)

    monkeypatch.setitem(objectives.LOSS_FUNCTIONS, "norm_mse", spy)
    sim = simfx.transform(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = sim(x)
    assert out.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sim.simfx.parameters())


def test_compile_under_autocast_bf16_cpu():
    sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16)).train()
    compiled = torch.compile(sim, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = compiled(torch.randn(4, 3, 16, 16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_export_of_stripped_module_equals_the_original():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    sim = simfx.transform(model, x)
    exported = torch.export.export(simfx.strip(sim).eval(), (x,))
    model.eval()
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))


# --- GPU (marked gpu: skipped without CUDA; benchmarks/gpu_check.sh runs them) --------


def _resnet50_cuda(**options):
    model = torchvision.models.resnet50(num_classes=100).cuda()
    return simfx.transform(model, torch.randn(2, 3, 64, 64, device="cuda"), **options).train()


def _train_compiled(sim, compiled, steps=3, batch=8, dtype=torch.bfloat16):
    opt = torch.optim.SGD(sim.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, 3, 64, 64, device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            out, loss = compiled(x)
            total = out.float().square().mean() + loss
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    return torch.stack(losses)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_cuda_inductor_modes_train_resnet50(mode):
    sim = _resnet50_cuda()
    counters.clear()
    compiled = torch.compile(sim, fullgraph=True, mode=mode)
    losses = _train_compiled(sim, compiled)
    assert torch.isfinite(losses).all() and (losses > 0).all()
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.gpu
def test_cuda_sampling_stays_on_device_without_host_sync():
    for sampling in ("shared", "per_sample", "topk_mean"):
        sim = _resnet50_cuda(token_sampling=sampling)
        x = torch.randn(4, 3, 64, 64, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, loss = sim(x)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert loss.device.type == "cuda"
    # the compiled graph holds no CPU tensor
    graph_devices = set()

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                graph_devices.add(value.device.type)
        return gm.forward

    dynamo.reset()
    torch.compile(sim, backend=record, fullgraph=True)(x)
    assert graph_devices == {"cuda"}


@pytest.mark.gpu
def test_cuda_fp16_with_grad_scaler():
    sim = _resnet50_cuda()
    scaler = torch.amp.GradScaler("cuda")
    opt = torch.optim.SGD(sim.parameters(), lr=0.01)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            out, loss = sim(torch.randn(8, 3, 64, 64, device="cuda"))
            total = out.float().square().mean() + loss
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
