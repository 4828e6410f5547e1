"""The demo behind ``simfx demo``: a torchvision ResNet-18 trained with and without SIM on CPU.

Data: scikit-learn's 8x8 handwritten digits (1,797 images that ship inside the
package, nothing is downloaded), upsampled to 48x48 (so the last ResNet stage
is still 2x2 and all 8 blocks take SIM), repeated over three channels, and split
80/20 with stratification.

Both arms start from the same weights, see the same batches in the same order
and carry the same reconstructors:

* **SIM**: ``loss = cross_entropy + sim_loss``, the reconstructors' gradient
  reaches the blocks;
* **baseline**: ``loss = cross_entropy``; the reconstructors still train on
  ``sim_loss`` as probes (their gradient stops at them), so the SIM loss of both
  arms measures the same thing: how much of each block's input its output keeps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import simfx

__all__ = ["DemoResult", "load_digits", "run_demo"]


@dataclass
class ArmHistory:
    """Per-step losses and per-epoch test accuracy of one arm."""

    name: str
    task: list[float] = field(default_factory=list)
    sim: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DemoResult:
    baseline: ArmHistory
    sim: ArmHistory
    blocks: list[str]
    plot: Path | None


def load_digits(image_size: int = 48, seed: int = 0, subset: int | None = None):
    """(train_x, train_y, test_x, test_y): digits as normalised ``(N, 3, S, S)`` float tensors."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("simfx demo needs scikit-learn for its dataset: pip install scikit-learn") from None
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed, stratify=labels.numpy()
    )
    if subset is not None:
        train_idx, test_idx = train_idx[:subset], test_idx[: max(10, subset // 4)]
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def run_demo(
    epochs: int = 3,
    *,
    batch_size: int = 64,
    image_size: int = 48,
    beta: float = 5e-3,
    lr: float = 1e-3,
    seed: int = 0,
    subset: int | None = None,
    out: str | Path | None = "simfx-demo/curves.png",
    progress: bool = True,
) -> DemoResult:
    """Train both arms, print task loss, SIM loss and test accuracy per epoch, and plot the curves."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits(image_size, seed, subset)
    model = torchvision.models.resnet18(num_classes=10)
    started = time.perf_counter()
    template = simfx.transform(model, example_inputs=train_x[:2], beta=beta, copy=True)
    blocks = [b.name for b in template.sim_blocks]
    print(f"ResNet-18 on scikit-learn digits ({len(train_y)} train / {len(test_y)} test images, "
          f"{image_size}x{image_size}); simfx.transform took {time.perf_counter() - started:.1f}s.")
    print(simfx.explain(template, name="resnet18"))
    print()

    arms = []
    for name in ("baseline", "sim"):
        sim = copy.deepcopy(template)  # same initial weights for both arms
        arms.append(_train_arm(name, sim, train_x, train_y, test_x, test_y, epochs, batch_size, lr, seed, progress))

    baseline, with_sim = arms
    print(f"\n{'arm':<9} {'task loss':>9} {'SIM loss':>9} {'test acc':>8} {'time':>6}")
    for arm in arms:
        print(f"{arm.name:<9} {_tail_mean(arm.task):>9.4f} {_tail_mean(arm.sim):>9.5f} "
              f"{arm.accuracy[-1]:>8.2%} {arm.seconds:>5.0f}s")
    print("(losses: mean of the last epoch's steps; SIM loss = beta * mean block loss, "
          "trained as a probe in the baseline)")
    plot = _plot(baseline, with_sim, Path(out), beta, image_size) if out else None
    if plot is not None:
        print(f"wrote {plot}")
    return DemoResult(baseline, with_sim, blocks, plot)


def _train_arm(name, sim, train_x, train_y, test_x, test_y, epochs, batch_size, lr, seed, progress) -> ArmHistory:
    from tqdm.auto import tqdm

    history = ArmHistory(name)
    optimizer = torch.optim.AdamW(sim.parameters(), lr=lr)
    heads = list(sim.get_submodule("simfx").parameters())
    generator = torch.Generator().manual_seed(seed)  # same batches for both arms
    steps = -(-len(train_y) // batch_size)
    started = time.perf_counter()
    bar = tqdm(total=epochs * steps, desc=f"{name:<8}", disable=not progress, leave=True, unit="step")
    for epoch in range(epochs):
        sim.train()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(steps):
            index = order[i * batch_size:(i + 1) * batch_size]
            logits, sim_loss = sim(train_x[index])
            task = F.cross_entropy(logits, train_y[index])
            if name == "sim":
                (task + sim_loss).backward()
            else:
                # Probe: the reconstructors learn from sim_loss, the blocks only from the task.
                grads = torch.autograd.grad(sim_loss, heads, retain_graph=True)
                task.backward()
                for p, g in zip(heads, grads):
                    p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.task.append(task.item())
            history.sim.append(sim_loss.item())
            bar.set_postfix(task=f"{task.item():.3f}", sim=f"{sim_loss.item():.4f}", refresh=False)
            bar.update()
        history.accuracy.append(_accuracy(sim, test_x, test_y))
        bar.write(f"{name:<8} epoch {epoch + 1}: task loss {_tail_mean(history.task, steps):.4f}  "
                  f"SIM loss {_tail_mean(history.sim, steps):.5f}  test accuracy {history.accuracy[-1]:.2%}")
    bar.close()
    history.seconds = time.perf_counter() - started
    return history


@torch.no_grad()
def _accuracy(sim, x, y, batch_size: int = 256) -> float:
    sim.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        logits, _ = sim(x[i:i + batch_size])
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    sim.train()
    return correct / len(y)


def _tail_mean(values: list[float], n: int | None = None) -> float:
    tail = values[-n:] if n else values[-max(1, len(values) // 3):]
    return sum(tail) / len(tail)


def _plot(baseline: ArmHistory, with_sim: ArmHistory, path: Path, beta: float, image_size: int) -> Path:
    from matplotlib.figure import Figure  # not pyplot: no GUI backend needed

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    colours = {"baseline": "#7a7a7a", "sim": "#c76b12"}
    labels = {"baseline": "baseline (SIM loss: probe only)", "sim": f"with SIM (beta={beta:g})"}
    for arm in (baseline, with_sim):
        steps = range(1, len(arm.task) + 1)
        axes[0].plot(steps, _smooth(arm.task), color=colours[arm.name], label=labels[arm.name])
        axes[1].plot(steps, _smooth(arm.sim), color=colours[arm.name], label=labels[arm.name])
        epochs = range(1, len(arm.accuracy) + 1)
        axes[2].plot(epochs, [100 * a for a in arm.accuracy], "o-", color=colours[arm.name], label=labels[arm.name])
    axes[0].set(title="task loss (cross-entropy)", xlabel="step", yscale="log")
    axes[1].set(title="SIM loss (beta x mean block loss)", xlabel="step")
    axes[2].set(title="test accuracy (%)", xlabel="epoch", xticks=list(range(1, len(baseline.accuracy) + 1)))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"simfx demo: torchvision ResNet-18 on scikit-learn digits ({image_size}x{image_size}), CPU",
                 fontsize=11)
    fig.savefig(path, dpi=120)
    return path


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
