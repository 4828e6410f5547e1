"""The performance benchmarks run (quick modes, seconds) and measure what they claim.

No timing is asserted here: speed targets live in the benchmarks' own reports.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import simfx
from conftest import loaded_script

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_overhead_quick_run_writes_consistent_results(tmp_path):
    _run("overhead.py", tmp_path)
    payload = json.loads((tmp_path / "overhead-cpu.json").read_text())
    assert (tmp_path / "overhead-cpu.md").read_text().startswith("Command: `python benchmarks/overhead.py --quick")
    rows = {r["variant"]: r for r in payload["results"][0]["rows"]}
    assert set(rows) == {"baseline", "simfx", "hooks"}
    assert rows["baseline"]["ratio"] == 1.0 and all(r["median_ms"] > 0 and r["steps"] == 2 for r in rows.values())
    # SIM adds work, and the hand-written version adds the same matmuls on the same blocks.
    assert rows["simfx"]["added_flops_pct"] > 1
    assert rows["hooks"]["gflops"] == pytest.approx(rows["simfx"]["gflops"], rel=0.01)
    assert all(r["peak_mb"] > 0 for r in rows.values())
    assert payload["meta"]["load_average_before"] is None or len(payload["meta"]["load_average_before"]) == 3


def test_transform_time_quick_run_times_every_stage(tmp_path):
    _run("transform_time.py", tmp_path)
    payload = json.loads((tmp_path / "transform_time.json").read_text())
    rows = {r["model"]: r for r in payload["transform"]}
    assert rows["resnet18"]["blocks"] == 8 and rows["residual48"]["blocks"] == 48
    for r in rows.values():
        stages = r["stages_s"]
        assert set(stages) == {"trace", "shapes", "boundaries", "select", "rewrite", "check"}
        assert all(v > 0 for k, v in stages.items() if k != "select")
        assert sum(stages.values()) <= r["total_s"] * 1.01 + 1e-3
        assert r["nodes"] > 50


@pytest.fixture(scope="module")
def overhead():
    with loaded_script(ROOT / "benchmarks" / "overhead.py", "overhead_bench") as module:
        yield module


def test_hand_written_hooks_compute_the_same_loss_as_simfx(overhead):
    # With every token kept there is no random draw, so with the same reconstructor
    # weights the two implementations must agree: the comparison is like for like.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    sim = simfx.transform(copy.deepcopy(model), x[:2], token_ratio=1.0)
    names = [b.name for b in sim.simfx_info.plan.blocks]
    hooks = overhead.HookSim(copy.deepcopy(model), names, x, token_ratio=1.0).train()
    for block in sim.simfx_info.plan.blocks:
        hooks.heads[block.key].load_state_dict(sim.simfx[block.key].objective.state_dict())
    out_sim, loss_sim = sim(x)
    out_hooks, loss_hooks = hooks(x)
    torch.testing.assert_close(out_sim, out_hooks)
    torch.testing.assert_close(loss_sim, loss_hooks, rtol=1e-4, atol=1e-6)
