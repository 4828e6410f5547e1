"""The demo behind ``simfx demo``: SIM on a torchvision ResNet-18, trained briefly on CPU.

The data is generated: 8 classes, each a fixed random 3x32x32 pattern plus noise,
so the task is learnable in a few dozen steps and nothing is downloaded.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import torchvision

import simfx


def run_demo(steps: int = 40, seed: int = 0, batch: int = 16, image: int = 64, classes: int = 8) -> list[tuple[float, float]]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=classes)
    started = time.perf_counter()
    sim = simfx.transform(model, example_inputs=torch.randn(2, 3, image, image))
    print(f"simfx.transform(resnet18) took {time.perf_counter() - started:.2f}s; SIM on {len(sim.sim_blocks)} blocks:")
    for block in sim.sim_blocks:
        b = block.boundary
        print(f"  {b.name:<10} {b.type_name:<11} {'x'.join(map(str, b.in_shape))} -> {'x'.join(map(str, b.out_shape))}")

    prototypes = torch.randn(classes, 3, image, image)
    # Adam is scale-invariant, so the reconstructors learn visibly despite beta = 5e-3.
    optimizer = torch.optim.AdamW(sim.parameters(), lr=1e-3)
    history = []
    sim.train()
    print(f"\n{'step':>4}  {'task loss':>9}  {'sim loss':>9}")
    for step in range(1, steps + 1):
        labels = torch.randint(0, classes, (batch,))
        images = prototypes[labels] + 0.8 * torch.randn(batch, 3, image, image)
        logits, sim_loss = sim(images)
        task = F.cross_entropy(logits, labels)
        (task + sim_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((task.item(), sim_loss.item()))
        if step == 1 or step % 10 == 0 or step == steps:
            print(f"{step:>4}  {task.item():>9.4f}  {sim_loss.item():>9.5f}")

    sim.eval()
    labels = torch.arange(classes).repeat(8)
    with torch.no_grad():
        logits, zero = sim(prototypes[labels] + 0.8 * torch.randn(len(labels), 3, image, image))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    print(f"\neval: accuracy {accuracy:.2%} on fresh samples, sim_loss {zero.item():.1f} (eval runs the original graph)")
    first, last = history[0][1], sum(h[1] for h in history[-5:]) / min(5, len(history))
    print(f"SIM loss fell from {first:.5f} to {last:.5f} (mean of the last 5 steps)")
    return history
