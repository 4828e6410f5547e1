"""Shared fixtures and tiny models for the simfx test suite."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn
from torch.utils import _pytree as pytree

# Two cores on CI: keep torch from oversubscribing them across pytest workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Property tests (tests/test_properties.py): "ci" is small and derandomized (the same
# examples every run); HYPOTHESIS_PROFILE=full draws 250 fresh architectures.
settings.register_profile(
    "ci", max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "full", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The last projector bias and the predictor bias of rho_sim add a constant over
# tokens just before norm_mse standardises over tokens: their gradient is 0 in
# exact maths (rounding noise, or exactly 0, in practice). For them the testable
# fact is "present and finite" (what DDP needs), not "non-zero".
ZERO_GRADIENT_BY_DESIGN = ("objective.proj.4.bias", "objective.predictor.bias")


def assert_reconstructor_gradients(named_parameters) -> None:
    """Every reconstructor parameter has a finite gradient, non-zero unless zero by design."""
    for name, p in named_parameters:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.endswith(ZERO_GRADIENT_BY_DESIGN):
            assert p.grad.abs().sum() > 0, name


def call(module, inputs):
    """``module`` called with example inputs as a model is: a dict as keywords, a tuple as positions."""
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def float_tensors(value) -> list:
    """The floating-point tensors of a (nested) output."""
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def loaded_script(path: Path, name: str):
    """Import a script that is not in a package (``benchmarks/*.py``) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them where there is none.

    One marker both skips them on CPU and selects them on a GPU machine
    (``python -m pytest -m gpu``, as ``benchmarks/gpu_check.sh`` runs them).
    """
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class InlineResidualNet(nn.Module):
    """Residuals written inline in the forward, with no module wrapping them."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # x: (B, N, 8)
        x = self.stem(x)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.head(x.mean(dim=1))


class ConvBlock(nn.Module):
    """A residual conv block that may downsample and widen."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.blocks = nn.Sequential(ConvBlock(8, 8), ConvBlock(8, 16, stride=2), ConvBlock(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class StopGradient(torch.autograd.Function):
    """A custom autograd Function whose backward differs from its forward's (a trace keeps only the forward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class PlainSequential(nn.Module):
    """No residual anywhere: auto falls back to weighted children of the Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding=1),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture
def tiny_resnet():
    return TinyResNet()


@pytest.fixture
def inline_net():
    return InlineResidualNet()
