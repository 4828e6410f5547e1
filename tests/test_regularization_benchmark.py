"""benchmarks/regularization.py: the paired statistics by hand, and a smoke run of the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import loaded_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "regularization.py"
SEEDSTATS = BENCH.with_name("seedstats.py")


@pytest.fixture(scope="module")
def reg():
    with loaded_script(BENCH, "regularization") as module:
        yield module


@pytest.fixture(scope="module")
def stats():
    with loaded_script(SEEDSTATS, "seedstats_for_regularization") as module:
        yield module


def _run(arm, seed, acc, wstd, probe=None):
    return {"dataset": "d", "arm": arm, "seed": seed, "test_acc": acc, "train_acc": 1.0, "weight_std": wstd,
            "reg_loss": None if arm == "baseline" else 1.0, "probe_sim_loss": probe, "beta": None, "seconds": 1.0}


def test_summary_pairs_arms_with_the_baseline_of_the_same_seed(reg, stats):
    results = [
        _run("baseline", 0, 0.90, 0.10), _run("baseline", 1, 0.80, 0.20), _run("baseline", 2, 0.70, 0.10),
        _run("x", 0, 0.92, 0.09), _run("x", 1, 0.83, 0.18), _run("x", 2, 0.71, 0.09),
    ]
    rows = {r["arm"]: r for r in reg.summarise(results)}
    x = rows["x"]
    assert x["test_acc"] == pytest.approx(0.82) and x["test_acc_std"] == pytest.approx(0.10535653752852741)
    # Same-seed differences 0.02, 0.03, 0.01: mean 0.02, std 0.01, t(0.975, 2) = 4.3027
    # (scipy's, or the 3-digit table without scipy: the pairing is tested, not the digits).
    mean, half = x["delta"]["test_acc"]
    assert mean == pytest.approx(0.02)
    assert half == pytest.approx(stats.t95(3) * 0.01 / math.sqrt(3), rel=1e-12)
    assert stats.t95(3) == pytest.approx(4.302652729911275, abs=5e-4)
    # Weight std relative change: -10% for every seed, so the interval has no width.
    mean, half = x["delta"]["weight_std"]
    assert mean == pytest.approx(-0.1) and half == pytest.approx(0.0, abs=1e-12)
    assert "probe_sim_loss" not in x["delta"] and rows["baseline"]["delta"] == {}
    table = reg.markdown_table(list(rows.values()))
    assert "| d | x | — | 82.00 ± 10.54 | +2.00 ± 2.48 | 100.0 |" in table
    assert "-10.00 ± 0.00% *" in table  # beyond seed noise
    assert "+2.00 ± 2.48 *" not in table  # the accuracy interval includes 0


@pytest.mark.slow
def test_quick_command_writes_table_json_and_plot(reg, tmp_path):
    for name in ("sklearn", "matplotlib"):  # the digits dataset, the plot
        pytest.importorskip(name)
    threads = torch.get_num_threads()
    try:
        results = reg.main(["--quick", "--seeds", "2", "--datasets", "digits", "--arms", "baseline", "self_model",
                            "--probe-steps", "2", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    assert [(r["arm"], r["seed"]) for r in results] == [("baseline", 0), ("self_model", 0),
                                                          ("baseline", 1), ("self_model", 1)]
    saved = json.loads((tmp_path / "regularization.json").read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/regularization.py --quick")
    assert len(saved["runs"]) == 4 and saved["summary"][1]["arm"] == "self_model"
    assert (tmp_path / "regularization.png").stat().st_size > 10_000
    assert "| digits | self_model | 0.001 |" in (tmp_path / "regularization.md").read_text()
    for r in results:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["weight_std"] > 0
        assert (r["reg_loss"] is None) == (r["arm"] == "baseline") and math.isfinite(r["probe_sim_loss"])
