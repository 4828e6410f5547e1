"""Seed studies, shared by regularization.py and complexity.py: the run loop and the statistics.

Every study trains each arm on the same seeds, and within a seed every arm starts
from the same weights and sees the same batches, so arm-minus-baseline differences
are **paired** by seed. These helpers give means with Student-t 95% intervals and
the paired differences; they take plain lists and dicts, so they are tested on
hand-computed values (tests/test_complexity_benchmark.py).
"""

from __future__ import annotations

import math
import statistics

__all__ = ["run_jobs", "t95", "mean_std", "mean_ci", "paired_difference", "excludes_zero"]


def run_jobs(jobs, run, *, label=str, postfix=None, progress: bool = True) -> list:
    """``[run(job) for job in jobs]``, in order, with a tqdm bar when ``progress``.

    ``label(job)`` describes the running job on the bar; ``postfix(result)`` returns a
    dict of values to show after each one.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="run", dynamic_ncols=True)
    results = []
    for job in jobs:
        if bar is not None:
            bar.set_description(label(job))
        results.append(run(job))
        if bar is not None:
            if postfix is not None:
                bar.set_postfix(postfix(results[-1]))
            bar.update()
    if bar is not None:
        bar.close()
    return results

# Two-sided 95% Student-t quantiles by degrees of freedom, for when scipy is missing.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for ``n - 1`` degrees of freedom (``n`` values)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return _T95.get(n - 1, 1.96)


def _present(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (``N - 1``) of the finite values; ``(None, None)`` if there are none."""
    values = _present(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_ci(values) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95% t-interval (``None`` half-width with fewer than 2 values)."""
    values = _present(values)
    mean, std = mean_std(values)
    if mean is None or len(values) < 2:
        return mean, None
    return mean, t95(len(values)) * std / math.sqrt(len(values))


def paired_difference(mine: list[dict], base: dict, key: str, kind: str = "points"):
    """Mean same-seed difference of ``key`` between runs ``mine`` and ``base`` ``{seed: run}``.

    ``kind="points"`` takes ``mine - base``; ``"relative"`` takes ``mine / base - 1``.
    Returns ``(mean, half-width of its 95% t-interval, n)``, or ``None`` when fewer
    than two seeds have both values.
    """
    diffs = []
    for run in mine:
        other = base.get(run["seed"])
        if other is None or run.get(key) is None or other.get(key) is None:
            continue
        diffs.append(run[key] - other[key] if kind == "points" else run[key] / other[key] - 1)
    if len(diffs) < 2:
        return None
    mean, half = mean_ci(diffs)
    return mean, half, len(diffs)


def excludes_zero(delta) -> bool:
    """Whether a ``(mean, half-width, ...)`` interval leaves 0 out (a difference beyond seed noise)."""
    return delta is not None and delta[1] is not None and abs(delta[0]) > delta[1]
