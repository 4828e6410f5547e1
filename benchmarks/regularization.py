"""Regularisation experiment: baseline vs rho_sim vs self_model vs activation_l2.

Two small real datasets, four arms, several seeds, CPU only::

    python benchmarks/regularization.py                      # the full run (5 seeds, under 20 min on 2 cores)
    python benchmarks/regularization.py --quick              # a smoke run in seconds
    python benchmarks/regularization.py --seeds 3 --datasets digits --out /tmp/reg

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with
  scikit-learn), a fixed stratified 75/25 split, a small ResNet of three
  torchvision ``BasicBlock`` s (16-16-32 channels, one strided).
* ``mnist1d``: MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d``
  package from its templates (4,000 train / 1,000 test sequences of length 40),
  a residual MLP of three pre-norm blocks ``x + W2 relu(W1 LN(x))`` (width 128).

Every arm uses the same model, initialisation, data order, optimiser and
schedule for a given seed; only the regulariser differs (a paired design, so
arm-minus-baseline differences per seed cancel most of the seed noise). The
regularised arms wrap the model with ``simfx.transform`` on the auto-selected
residual blocks (3 per model) and add ``sim_loss`` to the cross-entropy.

Reported per arm: final test accuracy (mean ± std over seeds), the paired
difference to the baseline with a 95% t-interval, the pooled std of the model's
weights (``simfx.metrics.weight_std``; reconstructors excluded), the arm's own
regulariser value (unweighted mean block loss) over the last epoch, and a probe
SIM loss comparable across arms: a fresh rho_sim reconstructor trained for 100
steps on the frozen final model (how well block inputs can be recovered from
block outputs; baseline included). Writes
``regularization.json``, ``regularization.md`` and ``regularization.png`` into
``--out``.

The functions here are importable (the notebook ``04_objectives.ipynb`` uses
them): :func:`load_dataset`, :func:`build_model`, :class:`TrainConfig`,
:func:`quick_config`, :func:`train_one`, :func:`run_experiment`,
:func:`summarise`, :func:`markdown_table`, :func:`plot_results`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

try:  # run from a checkout without installing simfx
    import simfx
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import simfx
from simfx.metrics import BlockLossMeter, weight_std

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runinfo, however this file is loaded
from runinfo import load_average, machine_info  # noqa: E402
from seedstats import mean_std as _mean_std  # noqa: E402
from seedstats import paired_difference, run_jobs  # noqa: E402

ARMS = ("baseline", "rho_sim", "self_model", "activation_l2")
DATASETS = ("digits", "mnist1d")

# Regulariser weights, fixed before the seeds were run and never tuned on test
# accuracy. rho_sim uses the paper's beta = 5e-3. The raw values of the other two
# are sums of squares over channels (tens here), so they get 1e-3: at
# initialisation each arm's weighted term is then 0.03-0.08, 1.5-3% of the initial
# cross-entropy (2.4), on both datasets.
DEFAULT_BETAS = {"rho_sim": 5e-3, "self_model": 1e-3, "activation_l2": 1e-3}


# --- data ------------------------------------------------------------------------


@dataclass
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int = 10


def load_dataset(name: str, *, limit: int | None = None) -> Data:
    """``"digits"`` (sklearn, 1x8x8 images) or ``"mnist1d"`` (generated offline, length-40 sequences).

    ``limit`` keeps only the first ``limit`` training and ``limit // 2`` test examples
    (for quick runs). Inputs are standardised with training-set statistics.
    """
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = train_test_split(
            torch.arange(len(y)).numpy(), test_size=0.25, stratify=y.numpy(), random_state=0
        )
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        # make_dataset builds the data from templates with a fixed seed; it never downloads
        # (get_dataset would fetch a pickle from GitHub, so it is not used).
        args = get_dataset_args()
        if limit is not None:
            args.num_samples = max(100, int(1.25 * limit) // 10 * 10)
        raw = make_dataset(args)
        x_train = torch.tensor(raw["x"], dtype=torch.float32)
        y_train = torch.tensor(raw["y"], dtype=torch.long)
        x_test = torch.tensor(raw["x_test"], dtype=torch.float32)
        y_test = torch.tensor(raw["y_test"], dtype=torch.long)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}.")
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[: max(1, limit // 2)], y_test[: max(1, limit // 2)]
    mean, std = x_train.mean(), x_train.std()
    return Data(name, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


# --- models ----------------------------------------------------------------------


class DigitsResNet(nn.Module):
    """Stem conv, three torchvision BasicBlocks (8x8 -> 8x8 -> 4x4 -> 4x4), pooled linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.blocks = nn.Sequential(
            BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2, downsample=down),
            BasicBlock(2 * width, 2 * width),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class ResidualMLPBlock(nn.Module):
    """Pre-norm residual MLP block ``x + W2 relu(W1 LN(x))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class Mnist1dMLP(nn.Module):
    """Linear stem, three residual MLP blocks, LayerNorm + linear head."""

    def __init__(self, length: int = 40, width: int = 128, depth: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Linear(length, width)
        self.blocks = nn.Sequential(*(ResidualMLPBlock(width, 2 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(F.relu(self.stem(x)))))


def build_model(dataset: str, *, size: str = "full") -> nn.Module:
    """The model for ``dataset``; ``size="tiny"`` shrinks widths for smoke runs."""
    tiny = size == "tiny"
    if dataset == "digits":
        return DigitsResNet(width=8 if tiny else 16)
    if dataset == "mnist1d":
        return Mnist1dMLP(width=32 if tiny else 128)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}.")


# --- training ----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters shared by every arm (only the regulariser differs)."""

    epochs: dict = field(default_factory=lambda: {"digits": 20, "mnist1d": 40})
    batch_size: dict = field(default_factory=lambda: {"digits": 64, "mnist1d": 128})
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: dict = field(default_factory=lambda: dict(DEFAULT_BETAS))
    size: str = "full"
    limit: int | None = None
    probe_steps: int = 100


def quick_config() -> TrainConfig:
    """Seconds instead of minutes: tiny models, 200 training examples, 2 epochs, short probe."""
    return TrainConfig(epochs={d: 2 for d in DATASETS}, size="tiny", limit=200, probe_steps=10)


def train_one(data: Data, arm: str, seed: int, config: TrainConfig, model: nn.Module | None = None) -> dict:
    """Train one model on ``data`` with the regulariser of ``arm``; return its measurements.

    The model's initialisation and the batch order depend only on ``seed``, so the
    arms of one seed start from the same weights and see the same batches. Adam,
    cosine learning-rate decay, no weight decay (so weight spread reflects the
    regulariser alone), no augmentation; the reported accuracy is the final
    epoch's (no early stopping on the test set).
    """
    torch.manual_seed(seed)
    if model is None:
        model = build_model(data.name, size=config.size)
    sim = None
    if arm != "baseline":
        if arm not in config.betas:
            raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS} (betas for {sorted(config.betas)}).")
        sim = simfx.transform(
            model, data.x_train[:8], objective=arm, beta=config.betas[arm], per_block=True
        )
    params = list((sim or model).parameters())
    epochs, batch = config.epochs[data.name], config.batch_size[data.name]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data.y_train) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    meter = BlockLossMeter()
    curve = []
    start = time.perf_counter()
    for epoch in range(epochs):
        train_ce = train_epoch(model, sim, data, batch, order, optimizer, meter, schedule)
        curve.append({"epoch": epoch + 1, "train_ce": train_ce,
                      "test_acc": accuracy(model, data.x_test, data.y_test)})
    train_seconds = time.perf_counter() - start
    block_losses = meter.compute() if sim is not None else {}
    finite = [v for v in block_losses.values() if math.isfinite(v)]
    return {
        "dataset": data.name,
        "arm": arm,
        "seed": seed,
        "test_acc": curve[-1]["test_acc"],
        "train_acc": accuracy(model, data.x_train, data.y_train),
        "train_ce": curve[-1]["train_ce"],
        "weight_std": weight_std(model).overall,
        "reg_loss": statistics.fmean(finite) if finite else None,
        "reg_loss_per_block": block_losses,
        "probe_sim_loss": probe_sim_loss(model, data, seed, config) if config.probe_steps else None,
        "beta": config.betas.get(arm),
        "seconds": train_seconds,
        "curve": curve,
    }


def train_epoch(model: nn.Module, sim: nn.Module | None, data: Data, batch: int, order: torch.Generator,
                optimizer: torch.optim.Optimizer, meter: BlockLossMeter, schedule=None) -> float:
    """One epoch over ``data``'s training set, batches in an order drawn from ``order``.

    With ``sim`` (a transform of ``model``) the loss is cross-entropy + ``sim_loss`` and
    ``meter`` (reset first) collects the per-block losses. ``schedule`` steps after every
    batch. Returns the epoch's mean training cross-entropy.
    """
    (sim or model).train()
    meter.reset()
    ce_sum = torch.zeros(())
    perm = torch.randperm(len(data.y_train), generator=order)
    for i in range(0, len(perm), batch):
        idx = perm[i : i + batch]
        if len(idx) < 2:
            continue  # BatchNorm needs two samples
        x, y = data.x_train[idx], data.y_train[idx]
        if sim is None:
            logits, reg = model(x), None
        else:
            logits, reg, per_block = sim(x)
            meter.update(per_block)
        ce = F.cross_entropy(logits, y)
        loss = ce if reg is None else ce + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        ce_sum += ce.detach() * len(idx)
    return ce_sum.item() / len(data.y_train)


def probe_sim_loss(model: nn.Module, data: Data, seed: int, config: TrainConfig) -> float:
    """How well a fresh rho_sim reconstructor can recover each block's input from its output.

    The same measure for every arm: on a frozen copy of the trained model, new rho_sim
    reconstructors (default options) train alone for ``config.probe_steps`` Adam steps
    on training batches; the result is their unweighted mean block loss over the
    last quarter of those steps. Lower means the blocks keep more of their input.
    """
    torch.manual_seed(seed)
    probe = simfx.transform(model, data.x_train[:8], copy=True, per_block=True).train()
    heads = [p for n, p in probe.named_parameters() if n.startswith("simfx.")]
    for name, p in probe.named_parameters():
        p.requires_grad_(name.startswith("simfx."))
    optimizer = torch.optim.Adam(heads, lr=config.lr)
    order = torch.Generator().manual_seed(seed + 1)
    batch, steps = config.batch_size[data.name], config.probe_steps
    meter = BlockLossMeter()
    for step in range(steps):
        idx = torch.randint(len(data.y_train), (batch,), generator=order)
        _, sim_loss, per_block = probe(data.x_train[idx])
        optimizer.zero_grad(set_to_none=True)
        sim_loss.backward()
        optimizer.step()
        if step >= steps - max(1, steps // 4):
            meter.update(per_block)
    values = [v for v in meter.compute().values() if math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # the shared submodules of a transformed model switch with it
    correct = sum((model(x[i : i + 512]).argmax(1) == y[i : i + 512]).sum().item() for i in range(0, len(y), 512))
    return correct / len(y)


def run_experiment(
    datasets=DATASETS, arms=ARMS, seeds=range(5), config: TrainConfig | None = None, progress: bool = True
) -> list[dict]:
    """Every (dataset, seed, arm) run, in that order; a tqdm bar when ``progress``."""
    config = config or TrainConfig()
    jobs = [(d, s, a) for d in datasets for s in seeds for a in arms]
    loaded = {d: load_dataset(d, limit=config.limit) for d in datasets}
    return run_jobs(jobs, lambda job: train_one(loaded[job[0]], job[2], job[1], config), progress=progress,
                    label=lambda job: f"{job[0]} seed {job[1]} {job[2]}",
                    postfix=lambda result: {"acc": f"{result['test_acc']:.3f}"})


# --- summary ------------------------------------------------------------------------


def _paired(mine: list[dict], base: dict, key: str, kind: str):
    """Mean same-seed difference to the baseline and the half-width of its 95% t-interval."""
    delta = paired_difference(mine, base, key, kind)
    return None if delta is None else delta[:2]


# Paired comparisons to the baseline: (result key, how a difference is expressed).
PAIRED = (("test_acc", "points"), ("weight_std", "relative"), ("probe_sim_loss", "relative"))


def summarise(results: list[dict]) -> list[dict]:
    """One row per (dataset, arm): means, stds, and paired differences to the baseline.

    ``row["delta"][key] = (mean, half_width)``: the mean over seeds of (arm - baseline)
    for the same seed (relative for weight std and probe loss) and the half-width of
    its 95% Student-t interval; a difference counts as beyond seed noise when the
    interval excludes 0.
    """
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        base = {r["seed"]: r for r in runs if r["arm"] == "baseline"}
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["arm"] == arm]
            row = {"dataset": dataset, "arm": arm, "seeds": len(mine), "beta": mine[0]["beta"], "delta": {}}
            for key in ("test_acc", "train_acc", "weight_std", "reg_loss", "probe_sim_loss", "seconds"):
                row[key], row[key + "_std"] = _mean_std([r[key] for r in mine])
            if arm != "baseline":
                for key, kind in PAIRED:
                    delta = _paired(mine, base, key, kind)
                    if delta is not None:
                        row["delta"][key] = delta
            rows.append(row)
    return rows


def _delta(row: dict, key: str, scale: float, unit: str) -> str:
    if key not in row["delta"]:
        return "—"
    mean, half = row["delta"][key]
    star = " *" if abs(mean) > half else ""
    return f"{scale * mean:+.2f} ± {scale * half:.2f}{unit}{star}"


def _mean_pm(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    if row[key] is None:
        return "—"
    return f"{format(scale * row[key], fmt)} ± {format(scale * row[key + '_std'], fmt)}"


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table, with a legend."""
    header = ("dataset", "arm", "beta", "test acc %", "Δ acc (pt)", "train acc %", "weight std",
              "Δ weight std", "own reg. loss", "probe SIM loss", "Δ probe", "s / run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join((
            r["dataset"], r["arm"], "—" if r["beta"] is None else f"{r['beta']:g}",
            _mean_pm(r, "test_acc", ".2f", 100), _delta(r, "test_acc", 100, ""),
            f"{100 * r['train_acc']:.1f}", _mean_pm(r, "weight_std", ".4f"), _delta(r, "weight_std", 100, "%"),
            _mean_pm(r, "reg_loss", ".3g"), _mean_pm(r, "probe_sim_loss", ".3f"), _delta(r, "probe_sim_loss", 100, "%"),
            f"{r['seconds']:.1f}",
        )) + " |")
    return "\n".join(lines) + (
        "\n\nMean ± std over seeds. Δ: mean same-seed difference to the baseline ± half-width of its 95% "
        "t-interval (accuracy in points, weight std and probe loss relative); `*` marks an interval that "
        "excludes 0. Own reg. loss: the arm's own objective (unweighted mean over blocks) over the last "
        "epoch. Probe SIM loss: a fresh rho_sim reconstructor trained on the frozen final model (lower = "
        "block inputs easier to recover from block outputs). s / run: training time of one run."
    )


def plot_results(results: list[dict], path: str | os.PathLike | None = None):
    """Per dataset: test accuracy, paired Δ accuracy, weight std, probe SIM loss (dots = seeds), curves."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    panels = (("test_acc", "test accuracy"), ("delta_acc", "Δ test accuracy vs baseline (same seed)"),
              ("weight_std", "weight std (pooled)"), ("probe_sim_loss", "probe SIM loss (rho_sim)"))
    fig, axes = plt.subplots(len(datasets), len(panels) + 1, figsize=(22, 3.8 * len(datasets)), squeeze=False)
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row, dataset in enumerate(datasets):
        runs = [r for r in results if r["dataset"] == dataset]
        base = {r["seed"]: r["test_acc"] for r in runs if r["arm"] == "baseline"}
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for i, arm in enumerate(arms):
                mine = [r for r in runs if r["arm"] == arm]
                if key == "delta_acc":
                    values = [r["test_acc"] - base[r["seed"]] for r in mine if r["seed"] in base]
                else:
                    values = [r[key] for r in mine if r[key] is not None]
                if not values:
                    continue
                ax.scatter([i] * len(values), values, color=colors[arm], alpha=0.6, s=18)
                mean, std = _mean_std(values)
                ax.errorbar([i + 0.15], [mean], yerr=[std], fmt="o", color="black", capsize=4, ms=4)
            if key == "delta_acc":
                ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(arms)), arms, rotation=20)
            ax.set_title(f"{dataset}: {label}", fontsize=10)
        ax = axes[row][-1]
        for arm in arms:
            curves = [r["curve"] for r in runs if r["arm"] == arm]
            epochs = [p["epoch"] for p in curves[0]]
            mean_curve = [statistics.fmean(c[e]["test_acc"] for c in curves) for e in range(len(epochs))]
            ax.plot(epochs, mean_curve, label=arm, color=colors[arm])
        ax.set_title(f"{dataset}: test accuracy per epoch", fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# --- command line -------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every dataset (default: digits 20, mnist1d 40)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--beta", action="append", default=[], metavar="ARM=VALUE",
                        help=f"override a regulariser weight, e.g. --beta self_model=0.01 (defaults {DEFAULT_BETAS})")
    # One thread: these models are too small to split, and on a shared 2-core machine
    # two threads per process contended badly (a step took 10-20x longer).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: at most 2 seeds, 2 epochs, tiny models, 200 training examples")
    parser.add_argument("--probe-steps", type=int, default=None,
                        help="training steps of the probe reconstructor (default 100; 0 skips the probe)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig()
    seeds = args.seeds
    if args.quick:
        config, seeds = quick_config(), min(seeds, 2)
    if args.probe_steps is not None:
        config.probe_steps = args.probe_steps
    if args.epochs is not None:
        config.epochs = {d: args.epochs for d in DATASETS}
    for item in args.beta:
        arm, _, value = item.partition("=")
        if arm not in DEFAULT_BETAS or not value:
            raise SystemExit(f"--beta expects ARM=VALUE with ARM one of {sorted(DEFAULT_BETAS)}, got {item!r}.")
        config.betas[arm] = float(value)

    started, load_before = datetime.datetime.now(datetime.timezone.utc), load_average()
    clock = time.perf_counter()
    results = run_experiment(args.datasets, args.arms, range(seeds), config, progress=not args.no_progress)
    seconds = time.perf_counter() - clock
    rows = summarise(results)
    table = markdown_table(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/regularization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "date": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
        "config": asdict(config),
        "seeds": seeds,
    }
    tmp = out / "regularization.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    tmp.replace(out / "regularization.json")
    m = meta["machine"]
    (out / "regularization.md").write_text(
        f"Command: `{meta['command']}`  \n"
        f"Date: {meta['date']}; total {seconds / 60:.1f} min on {m['cpu_model']} "
        f"({m['cpu_count']} cores, {m['torch_threads']} torch threads), load average before/after "
        f"{load_before}/{meta['load_average_after']}\n\n{table}\n"
    )
    plot_results(results, out / "regularization.png")
    print()
    print(table)
    print(f"\n{len(results)} runs in {seconds / 60:.1f} min; wrote {out}/regularization.{{json,md,png}}")
    return results


if __name__ == "__main__":
    main()
