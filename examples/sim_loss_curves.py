"""Per-block SIM-loss curves of a real run, logged to TensorBoard and drawn from its event files.

Trains a torchvision ResNet-18 with SIM on scikit-learn's 8x8 digits (upsampled so all
eight blocks take SIM), logs each block's SIM loss through ``simfx.metrics`` to a
TensorBoard ``SummaryWriter``, then reads the event files back and draws the curves
with matplotlib. It made ``docs/sim-loss-per-block.png``:

    python examples/sim_loss_curves.py                       # 300 steps: 12 min of CPU time on x86_64
    tensorboard --logdir sim-loss-curves/runs                # the same curves, live (Custom Scalars tab)

Needs ``pip install -e ".[demo]" tensorboard``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import simfx
from simfx.demo import load_digits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged point (the mean over them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("sim-loss-curves/runs"), help="TensorBoard log directory")
    parser.add_argument("--out", type=Path, default=Path("sim-loss-curves/sim-loss-per-block.png"))
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    """Train with SIM, writing each block's SIM loss to TensorBoard every ``log_every`` steps."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(args.seed)
    images, labels, _, _ = load_digits(args.image_size, args.seed)
    model = torchvision.models.resnet18(num_classes=10)
    sim = simfx.transform(model, images[:2], per_block=True)
    optimizer = torch.optim.SGD(sim.parameters(), lr=0.05, momentum=0.9)

    writer = SummaryWriter(args.runs)
    simfx.metrics.add_block_loss_chart(writer)
    meter = simfx.metrics.BlockLossMeter()
    order = torch.randperm(len(labels))
    for step in range(1, args.steps + 1):
        start = ((step - 1) * args.batch) % (len(labels) - args.batch + 1)
        batch = order[start:start + args.batch]
        out, sim_loss, per_block = sim(images[batch])
        loss = F.cross_entropy(out, labels[batch]) + sim_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.update(per_block)
        if step % args.log_every == 0:
            values = meter.log(step, writer=writer)
            writer.add_scalar("train/task_loss", (loss - sim_loss).item(), step)
            print(f"step {step}: " + " ".join(f"{name}={value:.3f}" for name, value in values.items()), flush=True)
    writer.close()


def read_block_losses(log_dir: Path, prefix: str = "sim/") -> dict[str, tuple[list[int], list[float]]]:
    """``{block: (steps, values)}`` of the scalars tagged ``prefix + block`` in a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    curves = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            points = events.Scalars(tag)
            curves[tag[len(prefix):]] = ([p.step for p in points], [p.value for p in points])
    return curves


def plot(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    colors = plt.get_cmap("viridis")
    for i, (block, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, values, label=block, color=colors(i / max(1, len(curves) - 1)), linewidth=1.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("block SIM loss (norm_mse, before beta)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="block", fontsize=8, ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    train(args)
    curves = read_block_losses(args.runs)
    title = (f"Per-block SIM losses: ResNet-18 on digits ({args.image_size}x{args.image_size}), "
             f"batch {args.batch}, mean of every {args.log_every} steps")
    print(f"wrote {plot(curves, args.out, title)}")


if __name__ == "__main__":
    main()
