"""A representative slice of the model-zoo runner (benchmarks/zoo.py) in CI.

Each model is built randomly initialised at the smallest probed input it accepts,
transformed with no options, trained one eager step, checked bit-equal against
the original in eval mode, and compiled with ``fullgraph=True``. The compile uses
the ``aot_eager`` backend: dynamo captures the whole train graph (one graph, no
breaks) and AOTAutograd traces its backward, without Inductor's code generation,
which takes minutes per model on a 2-core CPU. The full runner stays out of CI;
its tables are in benchmarks/README.md.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo  # noqa: E402

# One per architecture family: plain residuals, depthwise inverted residuals,
# channel shuffles, concatenating fire modules, no residual at all, NHWC ConvNeXt
# stages, windowed attention, class-token transformers, a segmentation head, 3D
# convolutions and three timm families. Bottleneck ResNets, DenseNets and
# EfficientNets are left to the full runner: they add no mechanism the others lack,
# and without them this file stays under three minutes on two cores.
SUBSET = [
    ("torchvision", "resnet18"),
    ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "shufflenet_v2_x0_5"),
    ("torchvision", "squeezenet1_0"),
    ("torchvision", "alexnet"),
    ("torchvision", "convnext_tiny"),
    ("torchvision", "swin_t"),
    ("torchvision", "vit_b_16"),
    ("torchvision-extra", "lraspp_mobilenet_v3_large"),
    ("torchvision-extra", "r3d_18"),
    ("timm", "fasternet:fasternet_t0"),
    ("timm", "starnet:starnet_s050"),
    ("timm", "edgenext:edgenext_xx_small"),
]


@lru_cache(maxsize=None)
def _specs(zoo_name: str) -> dict:
    return {s.name: s for s in zoo.ZOOS[zoo_name]()}


@pytest.mark.slow
@pytest.mark.parametrize("zoo_name,name", SUBSET, ids=[f"{z}/{n}" for z, n in SUBSET])
def test_model_transforms_trains_evaluates_and_compiles(zoo_name, name):
    if zoo_name == "timm":
        pytest.importorskip("timm")
    specs = _specs(zoo_name)
    if name not in specs:
        pytest.skip(f"{name} is not in this {zoo_name} version's zoo")
    result = zoo.check_model(specs[name], compile_backend="aot_eager")
    assert result.error == "", f"{result.stage}: {result.error}"
    assert result.traced and result.step_ok and result.eval_equal and result.compile_ok
    assert result.check == "passed"
    assert result.boundaries and result.boundaries > 0


def test_outputs_identical_counts_matching_nans_as_equal_and_nothing_else():
    import torch

    a = torch.tensor([1.0, float("nan"), 3.0])
    assert zoo.outputs_identical((a,), (a.clone(),))
    assert not zoo.outputs_identical(a, torch.tensor([1.0, 2.0, 3.0]))
    assert not zoo.outputs_identical(a, torch.tensor([1.0, float("nan"), 3.5]))
    assert not zoo.outputs_identical({"x": a}, {"x": a, "y": a})


def test_plain_fx_yardstick_tells_traceable_from_untraceable():
    import torch

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    assert zoo.plain_fx_traces(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not zoo.plain_fx_traces(DataDependent())
