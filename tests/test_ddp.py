"""DistributedDataParallel and FSDP2 over a transformed module: 2 CPU processes on gloo.

DESIGN's invariant that every reconstructor parameter gets a gradient every step
is what lets DDP run without ``find_unused_parameters``; these tests train for a
few steps and check that the ranks stay identical and the reconstructors learn,
with the training graph of fx and with a model that trains itself (export).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import simfx
from conftest import TinyResNet

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrap(sim, how: str):
    """The DDP module (its parameters) and the callable a training step runs."""
    if how == "eager":
        model = DDP(sim)  # no find_unused_parameters: every parameter gets a gradient
        return model, model
    if how == "ddp_of_compiled":
        # fullgraph on the inner module: one graph, one compiled backward; DDP's
        # all-reduce then runs once backward is done (no bucket overlap).
        model = DDP(torch.compile(sim, backend="aot_eager", fullgraph=True))
        return model, model
    # compile the DDP wrapper: dynamo's DDPOptimizer splits the graph at bucket
    # boundaries so all-reduce overlaps backward; DDP's own forward is not
    # traceable, so fullgraph=True does not apply here.
    model = DDP(sim)
    return model, torch.compile(model, backend="aot_eager")


def _worker(rank: int, port: int, how: str, frontend: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), frontend=frontend).train()
        before = {k: v.detach().clone() for k, v in sim.simfx.state_dict().items()}
        model, step = _wrap(sim, how)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)  # each rank sees its own data and its own token samples
        losses = []
        for _ in range(STEPS):
            x = torch.randn(4, 3, 16, 16)
            labels = torch.randint(0, 5, (4,))
            out, sim_loss = step(x)
            loss = torch.nn.functional.cross_entropy(out, labels) + sim_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(sim_loss.item())
        state = {k: v.detach().clone() for k, v in sim.named_parameters()}
        torch.save({"state": state, "before": before, "losses": losses}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, how: str, frontend: str = "fx"):
    mp.spawn(_worker, args=(_free_port(), how, frontend, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    return ranks


def _check(ranks):
    first = ranks[0]["state"]
    for other in ranks[1:]:
        assert other["state"].keys() == first.keys()
        # Parameters only: BatchNorm running statistics are per rank between DDP's broadcasts.
        for name, value in first.items():
            assert torch.equal(value, other["state"][name]), f"rank parameters differ at {name}"
    # DDP without find_unused_parameters raises on the step after a parameter got no
    # gradient, so finishing the steps shows every parameter was reduced. Weight
    # matrices must also move; biases before a norm_mse standardisation get a
    # gradient that is zero up to rounding (a constant shift over tokens cancels).
    before = ranks[0]["before"]
    weights = [name for name, value in before.items() if value.dim() >= 2]
    assert weights
    for name in weights:
        assert not torch.equal(before[name], first[f"simfx.{name}"]), f"simfx.{name} was not updated"
    for rank in ranks:
        assert all(loss > 0 for loss in rank["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("how, frontend", [
    ("eager", "fx"), ("ddp_of_compiled", "fx"), ("compiled_ddp", "fx"), ("eager", "export"), ("ddp_of_compiled", "export"),
])
def test_ddp_two_processes_keep_identical_parameters(tmp_path, how, frontend):
    _check(_run(tmp_path, how, frontend))


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
    return fully_shard


def _fsdp_worker(rank: int, port: int, frontend: str, results: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with pytest.raises(simfx.UnsupportedModelError, match=r"DistributedDataParallel-wrapped.*model\.module"):
            simfx.transform(DDP(TinyResNet()), torch.randn(2, 3, 16, 16))
        fully_shard = _fully_shard()
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        sim = simfx.transform(TinyResNet(), torch.randn(2, 3, 16, 16), frontend=frontend).train()
        for block in sim.sim_blocks:  # the usual per-block sharding, then the root
            fully_shard(sim.get_submodule(block.name), mesh=mesh)
        fully_shard(sim, mesh=mesh)
        optimizer = torch.optim.SGD(sim.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)
        losses = []
        for _ in range(STEPS):
            out, sim_loss = sim(torch.randn(4, 3, 16, 16))
            (torch.nn.functional.cross_entropy(out, torch.randint(0, 5, (4,))) + sim_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(sim_loss.item())
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in sim.named_parameters()}
        torch.save({"state": state, "losses": losses}, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fsdp2_per_block_fully_shard_after_transform_keeps_ranks_identical(tmp_path, frontend):
    mp.spawn(_fsdp_worker, args=(_free_port(), frontend, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    first = ranks[0]["state"]
    assert any(k.startswith("simfx.") for k in first)
    for name, value in first.items():
        assert torch.equal(value, ranks[1]["state"][name]), f"rank parameters differ at {name}"
    assert all(loss > 0 for rank in ranks for loss in rank["losses"])
