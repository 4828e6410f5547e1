"""benchmarks/profile_sim.py runs (quick mode) and accounts for SIM's surplus by op and by block."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import loaded_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profile_quick_run_splits_the_surplus_and_times_every_block(tmp_path):
    with loaded_script(ROOT / "benchmarks" / "profile_sim.py", "profile_sim_bench") as module:
        payload = module.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "profile-sim-resnet18.md").read_text().startswith("Command: `python benchmarks/profile_sim.py")
    ops = payload["per_op"]
    assert ops["sim_calls"] > ops["base_calls"]
    assert set(ops["groups_ms"]) == {"matrix products", "fused rho_sim node (Python)", "optimizer", "other ops"}
    assert ops["groups_ms"]["matrix products"] > 0  # SIM's FLOPs are matrix products
    blocks = payload["per_block"]
    # At 32x32 layer4's maps are 1x1: one token, too few for norm_mse, so auto leaves it out.
    assert [b["block"] for b in blocks] == ["layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1"]
    # k = max(2, floor(0.2 N)) tokens of each of the 4 samples.
    assert [b["rows"] for b in blocks] == [48, 48, 12, 12, 8, 8]
    assert all(b["full_ms"] > 0 and b["products_ms"] > 0 for b in blocks)
    split = payload["split"]
    assert set(split["ms"]) == {"plain", "transformed", "heads off"} and split["ratio"]["plain"] == 1.0
    assert split["rounds"] == 2 and split["clock"] in ("cpu", "wall")


def test_split_switches_off_the_heads_the_transformed_forward_runs():
    # "heads off" must replace the computation the forward really calls, or the split measures nothing.
    import torch
    import torchvision
    from unittest import mock

    import simfx
    from simfx.runtime import heads

    x = torch.randn(2, 3, 32, 32)
    sim = simfx.transform(torchvision.models.resnet18(num_classes=10), x).train()
    with loaded_script(ROOT / "benchmarks" / "profile_sim.py", "profile_sim_bench") as module:
        with mock.patch.object(heads, "rho_sim_norm_mse", module._zero_loss):
            _, off = sim(x)
    _, on = sim(x)
    assert off.item() == 0.0 and on.item() > 0.0
