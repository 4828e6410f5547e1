"""One test per bug found while hardening simfx (issue 8); each failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import simfx
from simfx.runtime.losses import norm_mse

from conftest import TinyResNet


class _Chain(nn.Module):
    """Linear blocks on (B, C) activations: one token per sample, B tokens in all."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_norm_mse_of_one_token_is_a_zero_carrying_a_gradient():
    # Was NaN with no graph: the aggregate skipped it, but the reconstructor got no
    # gradient (DDP would need find_unused_parameters) and per-block losses read NaN.
    prediction = torch.randn(3, 1, 8, requires_grad=True)
    loss = norm_mse(prediction, torch.randn(3, 1, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_batch_one_on_a_bc_block_gives_finite_loss_and_gradients_everywhere():
    sim = simfx.transform(_Chain(), torch.randn(4, 4), per_block=True)
    out, sim_loss, per_block = sim(torch.randn(1, 4))   # one token per block at batch 1
    assert sim_loss.item() == 0.0
    assert all(torch.isfinite(v) for v in per_block.values())
    sim_loss.backward()
    for name, p in sim.simfx.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_topk_mean_with_an_objective_that_reads_no_input_is_refused_at_transform():
    # Was accepted, then failed inside the first training forward.
    with pytest.raises(ValueError, match=r"block 'blocks\.0': token_sampling='topk_mean'.*'self_model'.*'shared'"):
        simfx.transform(_Chain(), torch.randn(8, 4), objective="self_model", token_sampling="topk_mean")


def test_compat_topk_mean_with_an_objective_that_reads_no_input_is_refused_at_class_definition():
    from simfx.compat import init_proj

    with pytest.raises(ValueError, match=r"Block: token_sampling_type='v2'.*'self_model'.*'v0'"):
        class Block(nn.Module):
            @init_proj(8, proj_type="self_model", token_sampling_type="v2")
            def __init__(self):
                super().__init__()


def test_original_state_dict_strips_compile_and_ddp_prefixes():
    # Was: keys kept '_orig_mod.' / 'module.', so they did not load into the original model.
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8))
    compiled = torch.compile(sim)   # compiles nothing until called; only the wrapper's keys matter
    ddp_like = {f"module.{k}": v for k, v in compiled.state_dict().items()}
    for checkpoint in (compiled.state_dict(), ddp_like):
        TinyResNet().load_state_dict(simfx.original_state_dict(checkpoint), strict=True)
    # A model with its own submodule called 'module' keeps it: not every key has the prefix.
    assert simfx.original_state_dict({"module.w": 1, "head.w": 2}) == {"module.w": 1, "head.w": 2}


def test_export_frontend_with_a_batch_one_example_runs_other_batch_sizes():
    # Was: export specialised the batch axis to 1 and batch 3 failed in a view.
    model = TinyResNet().eval()
    sim = simfx.transform(model, torch.randn(1, 3, 8, 8), frontend="export")
    for batch in (3, 1):
        x = torch.randn(batch, 3, 8, 8)
        sim.train()
        out, sim_loss = sim(x)
        assert out.shape == (batch, 5) and torch.isfinite(sim_loss)
        sim.eval()
        model.eval()
        assert torch.equal(sim(x)[0], model(x))


class _PermutedBlock(nn.Module):
    """Swin-style: an NCHW input is permuted to NHWC before its first weight layer."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return x + self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class _PermutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.blocks = nn.Sequential(_PermutedBlock(8), _PermutedBlock(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_channel_axis_of_a_block_that_permutes_its_input_follows_the_permute():
    # Was: the first weight layer (LayerNorm, last axis) named the input's last axis,
    # W, whenever W happened to equal C (8x8 maps of 8 channels).
    sim = simfx.transform(_PermutedNet(), torch.randn(2, 3, 8, 8))
    assert [(b.boundary.in_channel_dim, b.boundary.out_channel_dim) for b in sim.sim_blocks] == [(1, 1), (1, 1)]


def test_example_inputs_error_names_the_node_that_failed():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(simfx.ExampleInputsError, match=r"at node '_0' \(call_module 0\).*shapes cannot be multiplied"):
        simfx.transform(model, torch.randn(2, 5))


def test_example_inputs_on_another_device_than_the_model():
    # Was: the fake shape pass mixed 'meta' example tensors with CPU weights and
    # failed ("Tensor on device cpu is not on the expected device meta").
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(2, 3, 8, 8, device="meta"))
    assert [b.boundary.out_shape for b in sim.sim_blocks] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 16, 4, 4)]
