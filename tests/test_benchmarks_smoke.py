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


def _run(script: str, out: Path, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def test_overhead_quick_run_writes_consistent_results(tmp_path):
    # aot_eager: the compiled rows' code path in seconds (inductor on 2 CPU cores takes minutes).
    _run("overhead.py", tmp_path, "--modes", "eager", "compiled", "--backend", "aot_eager")
    payload = json.loads((tmp_path / "overhead-cpu.json").read_text())
    assert (tmp_path / "overhead-cpu.md").read_text().startswith("Command: `python benchmarks/overhead.py --quick")
    result = payload["results"][0]
    rows = {(r["mode"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(mode, v) for mode in ("eager", "compiled") for v in ("baseline", "simfx", "hooks")}
    assert result["failed"] == []
    for (mode, variant), r in rows.items():
        assert r["median_ms"] > 0 and r["steps"] == 2 and r["peak_mb"] > 0 and r["first_step_s"] > 0
        assert r["ratio"] == 1.0 if variant == "baseline" else r["ratio"] > 0
        # Compiling changes kernels, not arithmetic: a compiled row has its eager row's FLOPs and floor.
        assert r["gflops"] == rows[("eager", variant)]["gflops"]
        assert r["flop_floor"] == pytest.approx(1 + r["added_flops_pct"] / 100, abs=1e-3)
    # SIM adds work, and the hand-written version adds the same matmuls on the same blocks.
    assert rows[("eager", "simfx")]["added_flops_pct"] > 1
    assert rows[("eager", "hooks")]["gflops"] == pytest.approx(rows[("eager", "simfx")]["gflops"], rel=0.01)
    assert set(result["comparisons"]) >= {"simfx_eager_vs_hooks", "simfx_compiled_vs_hooks_compiled",
                                          "hooks_eager_vs_simfx_compiled", "simfx_compiled_vs_fastest_baseline"}
    assert payload["targets"] == []  # the targets speak of inductor, not of aot_eager
    assert payload["meta"]["load_average_before"] is None or len(payload["meta"]["load_average_before"]) == 3


def test_first_compile_quick_run_compiles_each_variant_in_its_own_empty_cache(tmp_path):
    cache_root = tmp_path / "caches"
    _run("first_compile.py", tmp_path, "--cache-root", str(cache_root), "--repeats", "2")
    payload = json.loads((tmp_path / "first-compile-cpu.json").read_text())
    rows = {(r["repeat"], r["variant"]): r for r in payload["rows"]}
    assert set(rows) == {(rep, v) for rep in (0, 1) for v in ("baseline", "simfx")}
    assert {r["cache_dir"] for r in rows.values()} == {
        str(cache_root / f"{v}-default-{rep}") for rep in (0, 1) for v in ("baseline", "simfx")}
    for r in rows.values():
        assert r["first_step_s"] > 0 and len(r["later_steps_s"]) == 1 and r["process_s"] >= r["first_step_s"]
        assert (r["transform_s"] is None) == (r["variant"] == "baseline")
    [ratio] = payload["ratios"]
    each = [rows[(rep, "simfx")]["first_step_s"] / rows[(rep, "baseline")]["first_step_s"] for rep in (0, 1)]
    assert ratio["pairs"] == 2
    assert ratio["first_step_ratio"] == pytest.approx(sum(each) / 2, rel=1e-2)  # the median of two
    assert ratio["ratio_range"] == pytest.approx([min(each), max(each)], rel=1e-2)


def test_first_compile_refuses_a_cache_that_is_not_empty(tmp_path):
    stale = tmp_path / "caches" / "baseline-default-0" / "fxgraph"
    stale.mkdir(parents=True)
    (stale / "entry").write_text("a compiled graph from an earlier run")
    refused = _run("first_compile.py", tmp_path, "--cache-root", str(tmp_path / "caches"), returncode=1)
    assert "is not empty, so the compile would not be cold" in refused.stderr


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


@pytest.mark.slow
def test_export_time_quick_run_times_the_transform_against_plain_exports(tmp_path):
    pytest.importorskip("transformers")  # the timed model is a tiny BertModel
    _run("export_time.py", tmp_path)
    row, = json.loads((tmp_path / "export_time-quick.json").read_text())["rows"]
    assert row["model"] == "bert-2x32"
    assert row["plain_export_s"] > 0 and row["transform_no_check_s"] > 0
    assert row["ratio"] == pytest.approx(row["transform_s"] / row["plain_export_s"], rel=0.01, abs=0.01)
    assert {"export", "shapes", "rewrite", "check"} <= {s for s, v in row["stages_s"].items() if v}


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
