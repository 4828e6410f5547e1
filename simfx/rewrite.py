"""Stage 5 — rewrite: the plan becomes a new GraphModule returning ``(output, sim_loss)``.

For each planned block one ``call_module`` node ``simfx.<key>(x, y)`` is inserted
right after the block's output ``y`` (so the sampled tokens are taken while ``y``
is fresh, before any later in-place op). One ``aggregate_losses`` node before the
output combines them (:func:`simfx.monitor.aggregate_losses`, which in eager mode
also warns about blocks whose loss was not finite and was skipped), and the
output becomes ``(output, sim_loss)`` — or ``(output, sim_loss, {name: loss})``
with ``per_block=True``. The eval graph stays the original computation and
returns a zero loss.

Inserted nodes carry ``node.meta["simfx_inserted"] = True`` and the boundary
name, which is how :func:`strip` and the inspection tools find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .boundaries import Boundary
from .graph_module import DualGraphModule, SimGraphModule
from . import monitor
from .objectives import BoundaryObjective, build_objective, get_objective
from .select import Plan, PlannedBlock
from .shapes import TensorMeta
from .trace import TracedModel, _copy_graph

__all__ = ["SimInfo", "NAMESPACE", "rewrite", "strip", "original_state_dict"]

NAMESPACE = "simfx"
INSERTED = "simfx_inserted"
BOUNDARY = "simfx_boundary"


@dataclass(frozen=True)
class SimInfo:
    """Plain-data record of a transform, kept on the module as ``simfx_info``."""

    plan: Plan
    candidates: tuple[Boundary, ...]
    opaque: Mapping[str, str] = field(default_factory=dict)
    example_shapes: tuple[tuple[int, ...] | None, ...] = ()
    per_block: bool = False
    frontend: str = "fx"


def rewrite(
    traced: TracedModel,
    plan: Plan,
    metas: Mapping[str, Any],
    *,
    candidates: Sequence[Boundary] = (),
    example_inputs: Sequence[Any] = (),
    per_block: bool = False,
) -> SimGraphModule:
    if NAMESPACE in traced.root._modules:
        raise ValueError(
            f"the model already has a submodule named '{NAMESPACE}' (is it a simfx-transformed module?); "
            f"call simfx.strip(module) first, or rename that submodule."
        )
    train_graph = _copy_graph(traced.train_graph)
    nodes = {n.name: n for n in train_graph.nodes}
    heads = nn.ModuleDict()
    losses: list[fx.Node] = []
    weights: list[float] = []
    # Reconstructors live with the model's parameters: example inputs may sit
    # elsewhere (on the meta device, or on the CPU for a model already on the GPU).
    device = next((p.device for p in traced.root.parameters()), None)
    for block in plan.blocks:
        heads[block.key] = _build_head(block, device)
        boundary = block.boundary
        x, y = nodes[boundary.entry], nodes[boundary.exit]
        with train_graph.inserting_after(y):
            loss = train_graph.call_module(f"{NAMESPACE}.{block.key}", (x, y))
        loss.meta[INSERTED] = True
        loss.meta[BOUNDARY] = boundary.name
        losses.append(loss)
        weights.append(float(block.options.beta))
        for name in boundary.nodes:
            nodes[name].meta.setdefault(BOUNDARY, boundary.name)

    output = _output_node(train_graph)
    result = output.args[0]
    with train_graph.inserting_before(output):
        # The monitor's aggregate: same maths, plus (eager only) a warning naming skipped blocks.
        names = tuple(b.name for b in plan.blocks)
        total = train_graph.call_function(monitor.aggregate_losses, (tuple(losses), tuple(weights), names))
    total.meta[INSERTED] = True
    per_block_losses = {b.name: n for b, n in zip(plan.blocks, losses)}
    output.args = ((result, total, per_block_losses) if per_block else (result, total),)
    train_graph.lint()

    eval_graph = _copy_graph(traced.eval_graph)
    eval_output = _output_node(eval_graph)
    with eval_graph.inserting_before(eval_output):
        zero = _zero_node(eval_graph, metas)
    zero.meta[INSERTED] = True
    eval_result = eval_output.args[0]
    eval_output.args = (
        (eval_result, zero, {b.name: zero for b in plan.blocks}) if per_block else (eval_result, zero),
    )
    eval_graph.lint()

    holder = _module_tree(traced)
    holder._modules[NAMESPACE] = heads
    sim = SimGraphModule(holder, train_graph, eval_graph)
    sim.simfx_info = SimInfo(
        plan=plan,
        candidates=tuple(candidates),
        opaque=dict(traced.opaque),
        example_shapes=tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in example_inputs),
        per_block=per_block,
        frontend=traced.frontend,
    )
    return sim


def _build_head(block: PlannedBlock, device: torch.device | None) -> BoundaryObjective:
    b, options = block.boundary, block.options
    if options.token_sampling == "topk_mean" and not get_objective(options.objective).uses_input:
        raise ValueError(
            f"block '{b.name}': token_sampling='topk_mean' ranks tokens by the block's input, which objective "
            f"{options.objective!r} does not read (uses_input=False); use token_sampling='shared' or "
            f"'per_sample' for this block (overrides={{{b.name!r}: {{'token_sampling': 'shared'}}}})."
        )
    in_cd, out_cd = _channel_dims(b, options.channel_dims())
    module = build_objective(
        options,
        in_channel_dim=in_cd,
        out_channel_dim=out_cd,
        in_width=b.in_meta.shape[in_cd],
        out_width=b.out_meta.shape[out_cd],
    )
    dtype = b.out_meta.dtype if b.out_meta.dtype.is_floating_point else None
    return module.to(device=device or torch.device(b.out_meta.device), dtype=dtype)


def _channel_dims(b: Boundary, override: tuple[int | None, int | None]) -> tuple[int, int]:
    dims = []
    for side, meta, inferred, forced in (
        ("input", b.in_meta, b.in_channel_dim, override[0]),
        ("output", b.out_meta, b.out_channel_dim, override[1]),
    ):
        if forced is None:
            dims.append(inferred)
            continue
        if not -meta.rank <= forced < meta.rank or forced % meta.rank == 0:
            raise ValueError(
                f"channel_dim={forced} for the {side} of block '{b.name}' (shape {meta.shape}) "
                f"must name a non-batch axis in 1..{meta.rank - 1}."
            )
        dims.append(forced % meta.rank)
    return dims[0], dims[1]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _zero_node(graph: fx.Graph, metas: Mapping[str, Any]) -> fx.Node:
    """A float32 scalar zero on the device of the first tensor input."""
    for node in graph.nodes:
        if node.op == "placeholder" and isinstance(metas.get(node.name), TensorMeta):
            return graph.call_method("new_zeros", (node, ()), {"dtype": torch.float32})
    return graph.call_function(torch.zeros, ((),), {"dtype": torch.float32})


def _module_tree(traced: TracedModel) -> nn.Module:
    """A holder with the user's children, parameters and buffers, plus fx's tensor constants."""
    root = traced.root
    holder = nn.Module()
    holder._modules = dict(root._modules)
    holder._parameters = dict(root._parameters)
    holder._buffers = dict(root._buffers)
    holder._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name in traced.constants:
        value = getattr(root, name)
        if isinstance(value, torch.Tensor):
            # Constants fx had to store are not model state: keep them out of state_dict().
            holder.register_buffer(name, value, persistent=False)
        else:
            setattr(holder, name, value)
    holder.training = root.training
    return holder


# --- strip --------------------------------------------------------------------


def strip(sim: nn.Module) -> DualGraphModule:
    """The transformed module without SIM: same parameters (shared), plain forward.

    The result runs the original train graph in training and the original eval
    graph in eval mode, returns only the model's output, and its ``state_dict()``
    loads into the original architecture with ``strict=True``.

    >>> import torch, torchvision, simfx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> sim = simfx.transform(model, torch.randn(2, 3, 64, 64))
    >>> plain = simfx.strip(sim)
    >>> _ = torchvision.models.resnet18(num_classes=10).load_state_dict(plain.state_dict())
    """
    if not isinstance(sim, SimGraphModule):
        raise TypeError(
            f"simfx.strip expects a module returned by simfx.transform, got {type(sim).__name__}."
        )
    graphs = [_without_sim(sim.graph), _without_sim(sim.eval_graph)]
    holder = nn.Module()
    holder._modules = {k: v for k, v in sim._modules.items() if k != NAMESPACE}
    holder._parameters = dict(sim._parameters)
    holder._buffers = dict(sim._buffers)
    holder._non_persistent_buffers_set = set(sim._non_persistent_buffers_set)
    holder.training = sim.training
    return DualGraphModule(holder, graphs[0], graphs[1])


def _without_sim(graph: fx.Graph) -> fx.Graph:
    graph = _copy_graph(graph)
    output = _output_node(graph)
    output.args = (output.args[0][0],)
    for node in reversed(list(graph.nodes)):
        if node.meta.get(INSERTED):
            graph.erase_node(node)
    graph.lint()
    return graph


def original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The original model's entries of a transformed module's ``state_dict`` (reconstructors dropped).

    Wrapper prefixes are removed first: ``_orig_mod.`` (a ``torch.compile``-d
    module's ``state_dict``) and ``module.`` (DDP's), in any nesting, when every
    key carries them, so a checkpoint of ``DDP(torch.compile(sim))`` loads into
    the plain original model with ``strict=True``.

    >>> sd = {"conv.weight": 1, "simfx.layer1_0.objective.predictor.weight": 2}
    >>> original_state_dict(sd)
    {'conv.weight': 1}
    >>> original_state_dict({"module._orig_mod.conv.weight": 1, "module._orig_mod.simfx.a.weight": 2})
    {'conv.weight': 1}
    """
    state_dict = dict(state_dict)
    while state_dict:
        wrapper = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if wrapper is None:
            break
        state_dict = {k[len(wrapper):]: v for k, v in state_dict.items()}
    prefix = f"{NAMESPACE}."
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


# Prefixes torch.compile (OptimizedModule) and DistributedDataParallel put before every key.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
