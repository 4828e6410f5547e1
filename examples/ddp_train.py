"""Train a SIM-transformed ResNet-18 with DistributedDataParallel.

Run on one machine with two processes (CPU with gloo, or one GPU per process with NCCL):

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --compile          # torch.compile the DDP module
    torchrun --nproc_per_node=2 examples/ddp_train.py --compile inner    # DDP over a fullgraph-compiled module

The data is generated (random images with a class-dependent pattern), so nothing
is downloaded. Every rank transforms the same model: ``simfx.transform`` is
deterministic for a given seed, and DDP broadcasts rank 0's parameters anyway.
No ``find_unused_parameters`` is needed: every reconstructor parameter gets a
gradient on every training step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import simfx


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="per-process batch size")
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument(
        "--compile", nargs="?", const="outer", choices=["outer", "inner"], default=None,
        help="outer: torch.compile(DDP(sim)), graph split at DDP buckets so all-reduce overlaps backward; "
        "inner: DDP(torch.compile(sim, fullgraph=True)), one graph, all-reduce after backward",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    classes = 10
    model = torchvision.models.resnet18(num_classes=classes).to(device)
    sim = simfx.transform(model, torch.randn(2, 3, args.image, args.image, device=device))
    if rank == 0:
        print(f"{world} processes on {device.type}; SIM on {len(sim.sim_blocks)} blocks")

    if args.compile == "inner":
        ddp = DDP(torch.compile(sim, fullgraph=True))
        step = ddp
    else:
        ddp = DDP(sim)
        step = torch.compile(ddp) if args.compile == "outer" else ddp
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    patterns = torch.randn(classes, 3, args.image, args.image, generator=torch.Generator().manual_seed(0))
    data = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own shard
    for i in range(1, args.steps + 1):
        labels = torch.randint(0, classes, (args.batch,), generator=data)
        images = patterns[labels] + torch.randn(args.batch, 3, args.image, args.image, generator=data)
        images, labels = images.to(device), labels.to(device)
        out, sim_loss = step(images)
        task = F.cross_entropy(out, labels)
        (task + sim_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (i == 1 or i % 5 == 0):
            print(f"step {i:3d}  task {task.item():.4f}  sim {sim_loss.item():.5f}")

    # Every rank holds the same parameters after the all-reduced steps.
    checksum = torch.stack([p.detach().double().sum() for p in ddp.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"parameters identical on all ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
