"""Emit — rewrite: the plan becomes a new GraphModule returning ``(output, sim_loss)`` in training.

Surgery only: every decision was made by the plan. The training graph is the
traced graph with three changes:

1. every chosen block that is one whole module call becomes a call of that
   module again (:mod:`simfx.emit.collapse`);
2. for each planned block one ``call_module`` node ``simfx.<key>(x, y)`` is
   inserted right after the block's output ``y`` (so the sampled tokens are
   taken while ``y`` is fresh, before any later in-place op); one
   ``aggregate_losses`` node before the output combines them
   (:func:`simfx.runtime.monitor.aggregate_losses`, which in eager mode also warns
   about blocks whose loss was not finite and was skipped), and the output becomes
   ``(output, sim_loss)`` — or ``(output, sim_loss, {name: loss})`` with
   ``per_block=True``;
3. where the model's traced code switched grad mode (``torch.no_grad()``,
   ``set_grad_enabled``), explicit ``torch._C._set_grad_enabled`` nodes switch it
   at the same places (restoring the caller's mode after each region).

For a capture whose ``runtime`` is ``"model"`` (torch.export) the graph is only a
picture of the training computation: the module trains by calling the model's
own forward, with a tap per block value at the module call the analysis found
(:mod:`simfx.analysis.taps`, :mod:`simfx.runtime.taps`).

Eval mode runs the model itself (:mod:`simfx.runtime.module`). What the rewrite did
to the graph's nodes (which it inserted, which block each belongs to, the module
calls each was recorded inside) is recorded in ``sim.simfx_info`` by node name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..analysis.boundaries import Boundary
from ..analysis.taps import BlockTaps, tap_points
from ..capture.inputs import CallTemplate
from ..capture.record import ScopeFrame, TracedModel
from ..fx_utils import copy_graph, output_node
from ..plan.select import Plan, PlannedBlock
from ..runtime import monitor
from ..runtime.heads import BoundaryObjective, build_objective
from ..runtime.info import SimInfo
from ..runtime.module import NAMESPACE, SimGraphModule
from ..runtime.taps import TapSpec
from .collapse import collapse_calls

__all__ = ["rewrite", "collapsible_frames", "plain_graph"]


@dataclass
class _NodeFacts:
    """What the emitted graph's nodes are, by name (the capture record's facts, kept up to date)."""

    scopes: dict[str, tuple[ScopeFrame, ...]]
    no_grad: set[str]
    inserted: set[str] = field(default_factory=set)
    boundary_of: dict[str, str] = field(default_factory=dict)


def rewrite(
    traced: TracedModel,
    plan: Plan,
    *,
    candidates: Sequence[Boundary] = (),
    per_block: bool = False,
    loss_in_output: bool = False,
    eval_call: CallTemplate | None = None,
    notes: tuple[str, ...] = (),
    example_shapes: tuple[tuple[int, ...], ...] | None = None,
) -> SimGraphModule:
    """The training graph for ``plan`` over ``traced``, wrapped in a :class:`SimGraphModule`.

    ``eval_call`` is how eval mode calls the model (default: as the training graph was traced);
    ``example_shapes`` the shapes of the user's example tensors (default: the graph's inputs').
    """
    if NAMESPACE in traced.root._modules:
        raise ValueError(
            f"the model already has a submodule named '{NAMESPACE}' (is it a simfx-transformed module?); "
            f"call simfx.strip(module) first, or rename that submodule."
        )
    graph = copy_graph(traced.graph)
    facts = _NodeFacts(dict(traced.scopes), set(traced.no_grad))
    renamed, collapsed = collapse_calls(
        graph, traced.calls, collapsible_frames(traced, plan), facts.scopes, facts.no_grad,
    )
    standing_for = {frame.key: names for frame, names in collapsed.items()}
    heads, losses, block_nodes = _insert_reconstructors(graph, traced, plan, renamed, standing_for, facts)
    _return_the_loss(graph, plan, losses, per_block, facts)
    _switch_grad_mode_as_traced(graph, facts)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)  # read only by code that now runs inside a module call
    graph.lint()

    holder = _module_tree(traced)
    holder._modules[NAMESPACE] = heads
    runs_model = traced.runtime == "model"
    traced_frames = set() if runs_model else _traced_frames(graph, facts)
    block_taps = {b.name: _taps_of(traced, b) for b in plan.blocks} if runs_model else {}
    model_modules = dict(traced.model.named_modules())
    sim = SimGraphModule(
        holder,
        graph,
        model=traced.model,
        call=traced.call,
        eval_call=eval_call,
        traced_modules=[(name, model_modules[name]) for name in traced_frames if name in model_modules and name],
        flag_readers=[
            (name, model_modules[name], where, value)
            for name, (where, reader, value) in traced.flag_readers.items()
            if name in model_modules and name and reader in traced_frames
        ],
        block_names=[b.name for b in plan.blocks],
        per_block=per_block,
        loss_in_output=loss_in_output,
        runtime=traced.runtime,
        taps=[
            TapSpec(index, role, tap.module, tap.call, tap.side, tap.path)
            for index, block in enumerate(plan.blocks)
            for role, tap in (("x", block_taps[block.name].x), ("y", block_taps[block.name].y))
        ] if runs_model else (),
        weights=[float(b.options.beta) for b in plan.blocks],
    )
    sim.simfx_info = SimInfo(
        plan=plan,
        candidates=tuple(candidates),
        opaque=dict(traced.opaque),
        example_shapes=example_shapes if example_shapes is not None else tuple(
            tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in traced.inputs),
        per_block=per_block,
        loss_in_output=loss_in_output,
        frontend=traced.frontend,
        calls=tuple(sorted(
            (name for name, t in block_taps.items() if _at_its_own_call(name, t)) if runs_model
            else (frame.key for frame in collapsed)
        )),
        traced=tuple(sorted(traced_frames)),
        nodes=block_nodes,
        inserted=frozenset(facts.inserted),
        boundary_of=dict(facts.boundary_of),
        scopes={n.name: facts.scopes.get(n.name, ()) for n in graph.nodes},
        notes=tuple(notes),
        runtime=traced.runtime,
        taps={name: (t.x.describe(), t.y.describe()) for name, t in block_taps.items()},
    )
    return sim


def _at_its_own_call(name: str, taps: BlockTaps) -> bool:
    """The block is read at the call of its own module (its argument and its result)."""
    return all((f"{t.module}@{t.call}" if t.call else t.module) == name for t in (taps.x, taps.y))


def _taps_of(traced: TracedModel, block: PlannedBlock) -> BlockTaps:
    found = tap_points(traced, block.boundary)
    if isinstance(found, str):  # the analysis marks such candidates ineligible: only a bug gets here
        raise AssertionError(f"block '{block.name}' cannot be read when the model runs: {found}")
    return found


def _insert_reconstructors(graph, traced: TracedModel, plan: Plan, renamed, standing_for, facts: _NodeFacts):
    """One ``simfx.<key>(x, y)`` node right after each block's output; the heads, loss nodes and node names."""
    nodes = {n.name: n for n in graph.nodes}
    heads = nn.ModuleDict()
    losses: list[fx.Node] = []
    block_nodes: dict[str, tuple[str, str, str]] = {}
    # Reconstructors live with the model's parameters: example inputs may sit
    # elsewhere (on the meta device, or on the CPU for a model already on the GPU).
    device = next((p.device for p in traced.root.parameters()), None)
    for block in plan.blocks:
        heads[block.key] = _build_head(block, device)
        boundary = block.boundary
        x = nodes[renamed.get(boundary.entry, boundary.entry)]
        y = nodes[renamed.get(boundary.exit, boundary.exit)]
        with graph.inserting_after(y):
            loss = graph.call_module(f"{NAMESPACE}.{block.key}", (x, y))
        facts.inserted.add(loss.name)
        facts.boundary_of[loss.name] = boundary.name
        facts.scopes[loss.name] = facts.scopes.get(y.name, ())
        if y.name in facts.no_grad:
            facts.no_grad.add(loss.name)
        losses.append(loss)
        block_nodes[boundary.name] = (x.name, y.name, loss.name)
        for name in (*boundary.nodes, *standing_for.get(boundary.name, ())):
            node = nodes.get(renamed.get(name, name))
            if node is not None:
                facts.boundary_of.setdefault(node.name, boundary.name)
    return heads, losses, block_nodes


def _return_the_loss(graph, plan: Plan, losses, per_block: bool, facts: _NodeFacts) -> None:
    """The output becomes ``(output, sim_loss)`` (and ``{block: loss}`` with ``per_block``)."""
    output = output_node(graph)
    result = output.args[0]
    with graph.inserting_before(output):
        # The monitor's aggregate: same maths, plus (eager only) a warning naming skipped blocks.
        names = tuple(b.name for b in plan.blocks)
        weights = tuple(float(b.options.beta) for b in plan.blocks)
        total = graph.call_function(monitor.aggregate_losses, (tuple(losses), weights, names))
    facts.inserted.add(total.name)
    per_block_losses = {b.name: n for b, n in zip(plan.blocks, losses)}
    output.args = ((result, total, per_block_losses) if per_block else (result, total),)


def collapsible_frames(traced: TracedModel, plan: Plan) -> list[ScopeFrame]:
    """Frames of planned module blocks that can run as one call of their module.

    Not when another planned block lies inside, or reads a value computed inside
    that the call would not return (its input or output is an inner node).
    """
    by_key = {frame.key: frame for frame in traced.calls}
    planned_nodes = [set(b.boundary.nodes) for b in plan.blocks]
    members: dict[ScopeFrame, set[str]] = {}
    for node in traced.graph.nodes:
        for frame in traced.scope(node):
            if frame in traced.calls:
                members.setdefault(frame, set()).add(node.name)
    frames = []
    for block, nodes in zip(plan.blocks, planned_nodes):
        frame = by_key.get(block.name) if block.boundary.kind == "module" else None
        if frame is None:
            continue
        if any(other is not nodes and other <= nodes for other in planned_nodes):
            continue  # another planned block lies inside: keep this one traced
        inner = members.get(frame, set()) - set(traced.calls[frame].outputs)
        if any(
            other is not block and {other.boundary.entry, other.boundary.exit} & inner for other in plan.blocks
        ):
            continue
        frames.append(frame)
    return frames


def _switch_grad_mode_as_traced(graph: fx.Graph, facts: _NodeFacts) -> None:
    """Insert grad-mode switches where the traced code ran under another grad mode than its caller.

    The trace ran with gradients enabled, so a node recorded with them off was
    inside ``torch.no_grad()`` (or ``set_grad_enabled(False)``). Each such region
    switches gradients off on entry and back to the caller's mode (read once, at
    the start of the forward) on exit.
    """
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if not any(n.name in facts.no_grad for n in nodes):
        return
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        caller_mode = graph.call_function(torch.is_grad_enabled, ())
    enabled = True
    for node in [*nodes, output_node(graph)]:
        wanted = node.op == "output" or node.name not in facts.no_grad
        if wanted == enabled:
            continue
        with graph.inserting_before(node):
            graph.call_function(torch._C._set_grad_enabled, (False if not wanted else caller_mode,))
        enabled = wanted


def _traced_frames(graph: fx.Graph, facts: _NodeFacts) -> set[str]:
    """Modules whose own code the graph runs (not as a call): the root and every traced-through scope."""
    names = {""}
    for node in graph.nodes:
        if node.name in facts.inserted:
            continue
        scope = facts.scopes.get(node.name, ())
        if node.op == "call_module":
            scope = scope[:-1]  # the called module itself runs its own code
        names.update(frame.name for frame in scope)
    return names


def _build_head(block: PlannedBlock, device: torch.device | None) -> BoundaryObjective:
    module = build_objective(
        block.options,
        in_channel_dim=block.in_channel_dim,
        out_channel_dim=block.out_channel_dim,
        in_width=block.in_width,
        out_width=block.out_width,
        in_batch_dim=block.boundary.in_batch_dim,
        out_batch_dim=block.boundary.out_batch_dim,
    )
    meta = block.boundary.out_meta
    dtype = meta.dtype if meta.dtype.is_floating_point else None
    return module.to(device=device or torch.device(meta.device), dtype=dtype)


def _module_tree(traced: TracedModel) -> nn.Module:
    """A holder with the user's children, parameters and buffers, plus the tracer's tensor constants."""
    root = traced.root
    holder = nn.Module()
    holder._modules = dict(root._modules)
    holder._parameters = dict(root._parameters)
    holder._buffers = dict(root._buffers)
    holder._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name in traced.constants:
        value = getattr(root, name)
        if isinstance(value, torch.Tensor):
            # Constants the tracer had to store are not model state: keep them out of state_dict().
            holder.register_buffer(name, value, persistent=False)
        else:
            setattr(holder, name, value)
    return holder


def plain_graph(sim: SimGraphModule) -> fx.Graph:
    """A copy of ``sim``'s training graph without the nodes simfx inserted: the model's own training computation."""
    graph = copy_graph(sim.graph)
    inserted = sim.simfx_info.inserted
    output = output_node(graph)
    output.args = (output.args[0][0],)
    for node in reversed(list(graph.nodes)):
        if node.name in inserted:
            graph.erase_node(node)
    graph.lint()
    return graph
