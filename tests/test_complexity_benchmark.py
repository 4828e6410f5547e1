"""benchmarks/complexity.py and benchmarks/seedstats.py: statistics by hand, and smoke runs of the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import loaded_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
T95_2DF = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


@pytest.fixture(scope="module")
def stats():
    with loaded_script(BENCHMARKS / "seedstats.py", "seedstats_under_test") as module:
        yield module


@pytest.fixture(scope="module")
def cx():
    with loaded_script(BENCHMARKS / "complexity.py", "complexity") as module:
        yield module


def test_mean_ci_and_paired_differences_by_hand(stats):
    mean, half = stats.mean_ci([1.0, 2.0, 3.0, None, float("nan")])  # missing values are left out
    assert mean == pytest.approx(2.0) and half == pytest.approx(T95_2DF * 1.0 / math.sqrt(3))
    assert stats.mean_ci([5.0]) == (5.0, None) and stats.mean_ci([]) == (None, None)
    assert stats.mean_std([2.0, 4.0]) == pytest.approx((3.0, math.sqrt(2.0)))

    base = {0: {"seed": 0, "v": 1.0}, 1: {"seed": 1, "v": 2.0}, 2: {"seed": 2, "v": 4.0}}
    mine = [{"seed": 0, "v": 1.1}, {"seed": 1, "v": 2.4}, {"seed": 2, "v": 4.4}, {"seed": 9, "v": 0.0}]
    # Same-seed differences 0.1, 0.4, 0.4 (seed 9 has no baseline): mean 0.3, std sqrt(0.03).
    mean, half, n = stats.paired_difference(mine, base, "v", "points")
    assert (mean, n) == (pytest.approx(0.3), 3) and half == pytest.approx(T95_2DF * math.sqrt(0.03) / math.sqrt(3))
    # Relative: +10%, +20%, +10%: mean 13.33%, std 5.774%.
    mean, half, n = stats.paired_difference(mine, base, "v", "relative")
    assert mean == pytest.approx(0.4 / 3) and half == pytest.approx(T95_2DF * math.sqrt(1 / 300) / math.sqrt(3))
    assert stats.excludes_zero((mean, half, n)) is False  # 0.133 ± 0.143
    assert stats.excludes_zero((-0.2, 0.1, 3)) and not stats.excludes_zero(None)
    assert stats.paired_difference(mine[:1], base, "v") is None  # one pair is not an interval


def test_llc_from_trace_by_hand(cx):
    trace = [[1.0, 1.2, 1.4, 1.6, 1.8], [1.0, 1.1, 1.3, 1.5, 1.7]]
    out = cx.llc_from_trace(trace, init_loss=1.0, nbeta=10.0, burnin=1)
    # After one burn-in step the chains average 1.5 and 1.4: LLCs 5 and 4.
    assert out["llc_per_chain"] == pytest.approx([5.0, 4.0]) and out["llc"] == pytest.approx(4.5)
    assert out["chain_std"] == pytest.approx(math.sqrt(0.5))
    # Halves of the post-burn-in draws, chains pooled: means 1.25 and 1.65.
    assert out["first_half"] == pytest.approx(2.5) and out["second_half"] == pytest.approx(6.5)
    assert out["drift"] == pytest.approx(4.0 / 4.5)
    assert out["trace"] == pytest.approx([1.0, 1.15, 1.35, 1.55, 1.75])  # 5 steps: one window each
    with pytest.raises(ValueError, match="at least 2 draws"):
        cx.llc_from_trace([[1.0, 1.0]], 1.0, 10.0, burnin=1)


def test_arms_strength_and_beta(cx):
    arms = cx.build_arms({"self_model": (1, 64), "activation_l2": (64,), "rho_sim": (0.5,)})
    assert [a.name for a in arms] == ["baseline", "self_model@1", "self_model@64", "activation_l2@64", "rho_sim@0.5"]
    # The paper's AW weighs a mean over units; simfx's objectives sum over them.
    assert [a.beta(64) for a in arms] == [None, 1 / 64, 1.0, 1.0, 0.5]
    assert cx.last_hidden((512, 256, 128, 64)) == "hidden.3"
    model = cx.PaperMLP(784, (512, 256, 128, 64))
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [512, 256, 128, 64, 10]


def _run(arm, seed, acc, sd, rlct, objective=None, strength=None):
    return {"dataset": "d", "arm": arm, "objective": objective, "strength": strength, "beta": None, "seed": seed,
            "test_acc": acc, "train_acc": 1.0, "train_ce": 0.1, "weight_std": sd,
            "weight_std_per_layer": {"a": sd, "b": 2 * sd}, "rlct": rlct, "reg_loss": None, "initial_share": None,
            "identity_gap": None, "train_seconds": 1.0,
            "rlct_detail": {"llc": rlct, "chain_std": 0.1 * rlct, "drift": 0.05, "failures": [], "seconds": 2.0}}


@pytest.fixture
def synthetic():
    base = [_run("baseline", s, acc, 0.10, 20.0) for s, acc in enumerate((0.90, 0.80, 0.70))]
    sm = [_run("self_model@1", s, acc, sd, r, "self_model", 1.0)
          for s, (acc, sd, r) in enumerate(((0.92, 0.09, 18.0), (0.83, 0.09, 16.0), (0.71, 0.09, 17.0)))]
    near = [_run("activation_l2@1", s, acc, 0.10, r, "activation_l2", 1.0)
            for s, (acc, r) in enumerate(((0.91, 20.0), (0.81, 22.0), (0.70, 24.0)))]
    far = [_run("activation_l2@50", s, 0.5, 0.05, 5.0, "activation_l2", 50.0) for s in range(3)]
    return base + sm + near + far


def test_summary_pairs_each_arm_with_the_baseline_of_its_seed(cx, synthetic):
    rows = {r["arm"]: r for r in cx.summarise(synthetic)}
    sm = rows["self_model@1"]
    assert sm["test_acc"] == pytest.approx(0.82) and sm["seeds"] == 3
    mean, half, n = sm["delta"]["test_acc"]  # differences 0.02, 0.03, 0.01
    assert (mean, n) == (pytest.approx(0.02), 3) and half == pytest.approx(T95_2DF * 0.01 / math.sqrt(3))
    mean, half, _ = sm["delta"]["weight_std"]  # -10% on every seed: no width
    assert mean == pytest.approx(-0.1) and half == pytest.approx(0.0, abs=1e-12)
    mean, _, _ = sm["delta"]["rlct"]  # -10%, -20%, -15%
    assert mean == pytest.approx(-0.15)
    assert sm["delta_layer"]["b"][0] == pytest.approx(-0.1)
    assert sm["rlct_stability"]["chain_cv"] == pytest.approx(0.1) and sm["rlct_stability"]["max_abs_drift"] == 0.05
    assert rows["baseline"]["delta"] == {} and rows["baseline"]["rlct_ci"] == pytest.approx(0.0)
    assert sm["seconds"] == pytest.approx(3.0)

    (pair,) = cx.matched_pairs(synthetic)
    assert (pair["self_model"], pair["activation_l2"]) == ("self_model@1", "activation_l2@1")  # closest accuracy
    assert pair["delta"]["test_acc"][0] == pytest.approx(0.0133333, rel=1e-4)
    assert pair["delta"]["rlct"][0] == pytest.approx((18 / 20 + 16 / 22 + 17 / 24) / 3 - 1)
    assert pair["accuracy_matched"] is True

    trend = {t["objective"]: t for t in cx.trends(synthetic)}
    rho, _ = trend["activation_l2"]["weight_std"]  # strength 0, 1, 50 against SD 0.10, 0.10, 0.05
    assert rho < 0 and trend["self_model"]["rlct"][0] < 0

    text = cx.markdown_report(list(rows.values()), [pair], list(trend.values()))
    assert ("| d | self_model@1 | — | — | 82.00 ± 26.17 | +2.00 ± 2.48 | 9.000 ± 0.000 | -10.00 ± 0.00% * "
            "| 17.0 ± 2.5 | -15.00 ± 12.42% * | 0.100 | 0.050 | 3.0 |") in text
    assert "| d | self_model@1 | activation_l2@1 |" in text and "| yes |" in text


@pytest.mark.slow
def test_quick_study_writes_tables_json_and_plots(cx, tmp_path):
    pytest.importorskip("devinterp")
    pytest.importorskip("mlxtend")
    threads = torch.get_num_threads()
    try:
        payload = cx.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    runs = payload["runs"]
    arms = ["baseline", "self_model@1", "self_model@10", "activation_l2@1", "activation_l2@10", "rho_sim@0.05",
            "rho_sim@0.5"]
    assert [(r["seed"], r["arm"]) for r in runs] == [(s, a) for s in range(2) for a in arms]
    saved = json.loads((tmp_path / "complexity-quick.json").read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/complexity.py --quick")
    assert saved["meta"]["cpu_seconds"] > 0 and saved["meta"]["machine"]["torch"] == torch.__version__
    assert [r["arm"] for r in saved["summary"]] == arms and saved["matched_pairs"] and saved["trends"]
    for name in ("sd", "rlct", "acc-rlct"):
        assert (tmp_path / f"complexity-quick-{name}.png").stat().st_size > 10_000
    text = (tmp_path / "complexity-quick.md").read_text()
    assert "| mnist5k | self_model@10 | 0.625 |" in text and "**Direction**" in text
    (tmp_path / "complexity-quick-sd.png").unlink()
    cx.main(["--quick", "--replot", "--out", str(tmp_path)])  # from the JSON alone: the same table, the plots back
    assert (tmp_path / "complexity-quick.md").read_text() == text and (tmp_path / "complexity-quick-sd.png").exists()
    for r in runs:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["weight_std"] > 0 and set(r["weight_std_per_layer"]) == {
            "hidden.0.0", "hidden.1.0", "head"}
        assert math.isfinite(r["rlct"]) and len(r["rlct_detail"]["llc_per_chain"]) == 2
        assert (r["reg_loss"] is None) == (r["arm"] == "baseline")
        assert (r["identity_gap"] is not None) == (r["objective"] == "self_model")


@pytest.mark.slow
def test_quick_digits_without_rlct(cx, tmp_path):
    threads = torch.get_num_threads()
    try:
        payload = cx.main(["--quick", "--datasets", "digits", "--objectives", "self_model", "--no-rlct",
                           "--sweep", "self_model=2", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert [r["arm"] for r in payload["runs"]] == ["baseline", "self_model@2"] * 2
    assert all(r["rlct"] is None and r["beta"] in (None, 2 / 16) for r in payload["runs"])
    assert (tmp_path / "complexity-quick-sd.png").exists() and not (tmp_path / "complexity-quick-rlct.png").exists()
